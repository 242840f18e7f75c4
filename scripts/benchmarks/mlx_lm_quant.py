#!/usr/bin/env python
"""Run one of mlx-lm's own quantizers (``mlx_lm.convert`` RTN, ``mlx_lm.awq``, ``mlx_lm.gptq``, ``mlx_lm.dwq``)
on a local HF checkpoint with *macq's* calibration token ids, offline, on a CPU.

    python scripts/bench.py mlx_lm_quant awq --model HF_DIR --calib ids.npy --out DIR -- --bits 3 --group-size 64 ...

Everything after ``--`` is passed to the tool's own ``main()`` (its CLI flags), which runs unchanged except for
three module-level names it imported, replaced here and nowhere else:

* ``load_data`` -> the ``[n, seq_len]`` token ids in ``--calib`` (``scripts/benchmarks/bench_quality.py --write-mlx-ids``),
  in their order. The tools' own loaders read ``~/.cache/mlx-lm/calibration_v5.txt`` (a download) and
  re-tokenise it into random chunks (awq/gptq), or a Hugging Face dataset (dwq); going through text would not
  give exactly the same ids (token merges across window boundaries), so the ids are handed over directly.
  dwq gets the first ``n - --dwq-valid`` sequences for training (``--dwq-repeat`` times: the tool makes one pass
  over its data) and the last ``--dwq-valid`` as its validation set (reported by the tool only).
* ``load`` -> mlx_lm's ``load`` whose floating weights are then rounded to fp16 values but kept in float32:
  ``mlx_lm.convert`` quantizes fp16-cast weights, and mlx's CPU build has no fast fp16 arithmetic (its fp16
  quantized matmul is ~40x slower than fp32 here), so the tools compute in fp32 on fp16 values.
* ``save`` -> every floating tensor (scales, biases, norms) cast to float16 first, so that the files hold what
  ``mlx_lm.convert --dtype float16`` and macq's exporter hold (same bytes per group). This rounds the tools'
  fp32 scales/biases to fp16 after they were chosen -- the one change to their output, ~1e-3 relative.

dwq is also run with ``dtype=float32`` (its default casts the tuned scales/biases to bfloat16 for the forward
and the result, which on this CPU means the slow path); its result is then cast to fp16 by ``save`` as above.

``convert`` calls ``mlx_lm.convert.convert(..., quantize=True, dtype="float16")`` itself (RTN, embedding
included). The checkpoint should carry ``rope_theta`` at the top level of config.json (transformers 5 nests it;
mlx_lm 0.32's llama would silently use 10000): ``scripts/benchmarks/compare_mlx.py``'s ``rope_patched_copy``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

TOOLS = ("convert", "awq", "gptq", "dwq")


def _fp16_values(model) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(mx.float16).astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating)
                          else a, model.parameters()))


def _to_fp16(model) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(mx.float16) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))


def patched_load(load):
    @functools.wraps(load)
    def wrapper(*a, **k):
        out = load(*a, **k)
        _fp16_values(out[0])
        return out
    return wrapper


def patched_save(save):
    @functools.wraps(save)
    def wrapper(dst, src, model, *a, **k):
        _to_fp16(model)
        return save(dst, src, model, *a, **k)
    return wrapper


def dense_quantized_kernels() -> None:
    """Make ``QuantizedLinear`` (and a tied ``QuantizedEmbedding`` head) compute ``x @ dequantize(codes, scales,
    biases).T`` instead of mlx's ``quantized_matmul``: the same function of the same parameters (gradients to the
    scales and biases included, which dwq trains), but mlx's CPU build has no fast quantized matmul (a 128-token
    forward of the 3-bit 135M model: 26 s quantized, 1.0 s dense here), and awq / dwq run quantized layers on
    thousands of tokens. The tools' algorithms are untouched; ``tests/test_mlxcmp.py`` checks outputs and
    gradients against the original kernels."""
    import mlx.core as mx
    import mlx.nn as nn

    orig_call, orig_as_linear = nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.as_linear

    def linear_call(self, x):
        if self.mode != "affine":
            return orig_call(self, x)
        w = mx.dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        y = x @ w.astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y

    def embedding_as_linear(self, x):
        if self.mode != "affine":
            return orig_as_linear(self, x)
        w = mx.dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        return x @ w.astype(x.dtype).T

    nn.QuantizedLinear.__call__ = linear_call
    nn.QuantizedEmbedding.as_linear = embedding_as_linear


def dwq_data(ids: np.ndarray, n_valid: int, repeat: int) -> tuple[list, list]:
    """mlx_lm.dwq's ``(train, valid)``: lists of ``(tokens, offset)`` as its ``load_data`` returns them."""
    if not 0 < n_valid < ids.shape[0]:
        raise SystemExit(f"error: --dwq-valid {n_valid}: expected 1..{ids.shape[0] - 1} (of {ids.shape[0]} sequences)")
    rows = [(r.tolist(), 0) for r in ids]
    return rows[:-n_valid] * repeat, rows[-n_valid:]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    tool_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tool", choices=TOOLS)
    ap.add_argument("--model", required=True, help="local HF directory (rope_theta at config.json's top level)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib", help="[n, seq_len] int token ids (.npy); awq, gptq, dwq")
    ap.add_argument("--bits", type=int, default=4, help="convert only")
    ap.add_argument("--group-size", type=int, default=64, help="convert only")
    ap.add_argument("--dwq-valid", type=int, default=2)
    ap.add_argument("--dwq-repeat", type=int, default=1)
    ap.add_argument("--quantized-kernels", action="store_true",
                    help="keep mlx's quantized_matmul (default: dequantize + matmul, see dense_quantized_kernels)")
    args = ap.parse_args(own)
    if not args.quantized_kernels:
        dense_quantized_kernels()
    if Path(args.out).exists():
        raise SystemExit(f"error: --out {args.out} exists")
    if args.tool == "convert":
        from mlx_lm.convert import convert

        convert(args.model, args.out, quantize=True, q_bits=args.bits, q_group_size=args.group_size, dtype="float16")
        return
    if not args.calib:
        raise SystemExit(f"error: --calib is required for {args.tool}")
    import importlib

    import mlx.core as mx

    ids = np.load(args.calib).astype(np.int32)
    mod = importlib.import_module(f"mlx_lm.quant.{args.tool}")
    mod.load = patched_load(mod.load)
    mod.save = patched_save(mod.save)
    if args.tool == "dwq":
        train, valid = dwq_data(ids, args.dwq_valid, args.dwq_repeat)
        mod.load_data = lambda *a, **k: (train, valid)
        mod.dwq_quantize = functools.partial(mod.dwq_quantize, dtype=mx.float32)
    else:
        mod.load_data = lambda *a, **k: mx.array(ids)
    sys.argv = [f"mlx_lm.{args.tool}", "--model", args.model, "--mlx-path", args.out, *tool_args]
    mod.main()


if __name__ == "__main__":
    main()

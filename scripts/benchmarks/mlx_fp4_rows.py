#!/usr/bin/env python
"""Benchmark: MLX's fp4 modes (mxfp4, nvfp4) on the default model, ``mlx_lm.convert --q-mode`` (RTN) against
macq's calibrated methods on the same grid, every row scored through ``mlx_lm.load``.

Rows per mode (each an MLX directory; weights stored fp16, the tied embedding quantized like every linear, as
``mlx_lm.convert`` does):

* ``mlx_lm.convert``: ``convert(hf, out, quantize=True, q_mode=MODE, dtype="float16")`` on the HF dir with
  ``rope_theta`` lifted to config.json's top level (mlx_lm 0.32's llama ignores the nested one);
* ``macq rtn``: ``--method rtn --mode MODE`` on the fp16-rounded weights; the script checks it equals the row
  above tensor for tensor (``identical_to_convert`` in the JSON);
* ``macq rtn --mse-clip``: each block's scale byte searched (data-free);
* ``macq gptq`` / ``awq`` / ``awq-gptq`` (``--methods``): decoder linears calibrated on ``--n-calib`` x
  ``--seq-len`` c4 windows (the second half of the bundled text; perplexity reads the first half), each method
  with its defaults and ``--mode MODE``, the embedding by RTN with the scale search; with ``--head-gptq`` the tied
  embedding (the output head) instead by GPTQ on the quantized model's final hidden states (rows
  ``macq-METHOD-head-MODE``).

``--stage build`` quantizes and exports (torch; run without the BLAS preload); ``--stage eval`` scores every
directory through mlx_lm on wiki and c4, ``--tokens`` tokens in ``--context``-token windows, computing in fp32
(exact upcast of the stored fp16 values); ``--stage head-probe`` scores ``--rows`` with the fp16 embedding put
back for the lookup and / or the tied head. For speed run the eval with OpenBLAS preloaded (PLATFORM.md,
"Making mlx usable on this CPU"). The gap closed is ``(ppl_rtn - ppl_method) / (ppl_rtn - ppl_fp16)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

DATASETS = ("wiki", "c4")


def build(args) -> dict:
    import torch
    from compare_mlx import fp16_rounded, rope_patched_copy
    from mlx_lm.convert import convert

    from macq.models import default_model_dir, load_model
    from macq.pipeline import calibration_ids
    from macq.quantizers import make_config, quantize_model
    from macq.quantizers.rtn import RTNConfig
    from mlx_backend import export_mlx

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = rope_patched_copy(default_model_dir(), work)
    info: dict = {"rows": {}}

    def fresh(p: Path) -> Path:
        shutil.rmtree(p, ignore_errors=True)
        return p

    if not (work / "fp16" / "config.json").is_file():
        convert(str(hf), str(fresh(work / "fp16")), dtype="float16")
    model, tok = load_model(None)
    base = fp16_rounded(model)
    calib = calibration_ids(tok, "c4", args.n_calib, args.seq_len)
    for mode in args.modes:
        ref = work / f"convert-{mode}"
        if not (ref / "config.json").is_file():
            t0 = time.perf_counter()
            convert(str(hf), str(fresh(ref)), quantize=True, q_mode=mode, dtype="float16")
            info["rows"][ref.name] = {"seconds": time.perf_counter() - t0}
        heads = dict(include_embeddings=True, include_lm_head=True)
        rtn_rows = (("rtn", RTNConfig(mode=mode, **heads)), ("rtn-mse", RTNConfig(mode=mode, mse_clip=True, **heads)))
        for tag, cfg in () if args.no_rtn else rtn_rows:
            t0 = time.perf_counter()
            qm = quantize_model(base, "rtn", cfg, source="default")
            export_mlx(qm, fresh(work / f"macq-{tag}-{mode}"), tokenizer=hf, dtype="float16", force=True)
            info["rows"][f"macq-{tag}-{mode}"] = {"seconds": time.perf_counter() - t0}
        if (work / f"macq-rtn-{mode}" / "config.json").is_file():
            info["rows"].setdefault(f"macq-rtn-{mode}", {})["identical_to_convert"] = \
                identical(ref, work / f"macq-rtn-{mode}")
        for method in args.methods:
            t0 = time.perf_counter()
            extra = dict(n_calib=args.n_calib, seq_len=args.seq_len) if method == "gptq" else {}
            cfg = make_config(method, mode=mode, head_gptq=args.head_gptq, **heads, **extra)
            qm = quantize_model(fp16_rounded(model), method, cfg, calib=calib, source="default")
            row = f"macq-{method}{'-head' if args.head_gptq else ''}-{mode}"
            export_mlx(qm, fresh(work / row), tokenizer=hf, dtype="float16", force=True)
            info["rows"][row] = {"seconds": time.perf_counter() - t0, "head": qm.method.get("stats", {}).get("head")}
    del torch
    return info


def identical(a: Path, b: Path) -> bool:
    import mlx.core as mx

    x, y = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and mx.array_equal(x[k], y[k]).item() for k in x)


def load_dequantized(path: Path):
    """``mlx_lm.load``, then mlx_lm's own ``dequantize_model`` (``mx.dequantize`` of every quantized layer: E2M1 /
    E4M3 times its scale is exact in the bf16 it returns) and an exact upcast to fp32: the stored weights' values,
    run through mlx's float matmul (its CPU fp4 kernels are far slower than BLAS here)."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import dequantize_model

    from mlx_backend.runner import load_mlx

    net, tok = load_mlx(path)
    dequantize_model(net)
    net.update(tree_map(lambda a: a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a,
                        net.parameters()))
    mx.eval(net.parameters())
    return net, tok


def evaluate(args) -> dict:
    from mlx_backend.runner import eval_mlx

    work = Path(args.work)
    dirs = ["fp16"] + [d.name for d in sorted(work.iterdir()) if d.name.startswith(("convert-", "macq-"))
                       and not d.name.startswith("macq-rtn-mx") and not d.name.startswith("macq-rtn-nv")]
    out = {}
    if args.rows:        # in the order given; a row still being built is waited for (--wait seconds)
        dirs = list(args.rows)
    for d in dirs:       # macq-rtn-MODE is skipped: the build checked it equals convert-MODE byte for byte
        deadline = time.monotonic() + args.wait
        while not (work / d / "config.json").is_file() and time.monotonic() < deadline:
            time.sleep(10)
        if not (work / d / "config.json").is_file():
            print(d, "missing: not scored", flush=True)
            continue
        out[d] = {}
        loaded = load_dequantized(work / d)
        for ds in DATASETS:
            t0 = time.perf_counter()
            r = eval_mlx(loaded, dataset=ds, context=args.context, max_tokens=args.tokens, speed_prompt=8,
                         speed_tokens=2)
            out[d][ds] = {"ppl": r["ppl"], "ppl_stderr": r["ppl_stderr"], "n_tokens": r["n_tokens"],
                          "seconds": time.perf_counter() - t0}
            print(d, ds, f"{r['ppl']:.3f}", flush=True)
    return out


def head_probe(args) -> dict:
    """Where a row's error sits: wiki perplexity of each ``--rows`` directory with the fp16 row's embedding matrix
    put back for the lookup and the tied head (``both``), for the head only (``head``: the lookup stays
    quantized) or for the lookup only (``lookup``: the head stays quantized)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_backend.runner import eval_mlx

    work = Path(args.work)
    f = load_dequantized(work / "fp16")[0].model.embed_tokens.weight
    out: dict = {}
    for d in args.rows:
        out[d] = {}
        for which in ("both", "head", "lookup"):
            net, tok = load_dequantized(work / d)
            q = net.model.embed_tokens.weight
            net.args.tie_word_embeddings = False          # the head becomes its own (float) layer
            net.lm_head = nn.Linear(q.shape[1], q.shape[0], bias=False)
            net.lm_head.weight = f if which in ("both", "head") else q
            net.model.embed_tokens.weight = f if which in ("both", "lookup") else q
            mx.eval(net.parameters())
            r = eval_mlx((net, tok), dataset="wiki", context=args.context, max_tokens=args.tokens, speed_prompt=8,
                         speed_tokens=2)
            out[d][f"fp16-{which}"] = {"wiki": r["ppl"], "ppl_stderr": r["ppl_stderr"]}
            print(d, f"fp16-{which}", f"{r['ppl']:.3f}", flush=True)
    return out


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def main() -> None:
    from outputs import check_json, check_scratch, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["build", "eval", "head-probe"], required=True)
    ap.add_argument("--work", default="/tmp/macq-mlx-fp4")
    ap.add_argument("--modes", nargs="+", default=["mxfp4", "nvfp4"])
    ap.add_argument("--methods", nargs="*", default=["gptq"], choices=["gptq", "awq", "awq-gptq"])
    ap.add_argument("--head-gptq", action="store_true", help="build: the tied head by GPTQ (--head-gptq)")
    ap.add_argument("--threads", type=int, default=0, help="build: torch threads (0 = torch's default)")
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--no-rtn", action="store_true", help="build: skip the macq rtn rows (already built)")
    ap.add_argument("--rows", nargs="*", default=[], help="eval: only these directories, in this order (default: all)")
    ap.add_argument("--wait", type=float, default=0, help="eval: seconds to wait for a --rows directory still being built")
    ap.add_argument("--json", required=True, help="results file (the stage's part is merged in)")
    args = ap.parse_args()
    check_json(args.json, False, merge=True)          # a new file, or this benchmark's own: merged into
    check_scratch(args.work, "mlx-fp4-scratch", inputs=(args.json,), flag="--work")
    path = Path(args.json)
    data = json.loads(path.read_text()) if path.is_file() else {}
    t0 = time.perf_counter()
    part = build(args) if args.stage == "build" else evaluate(args) if args.stage == "eval" else head_probe(args)
    key = args.stage if not args.rows else f"{args.stage}:{','.join(args.rows)}"
    data[key] = {"result": part, "argv": sys.argv[1:], "commit": commit(), "seconds": time.perf_counter() - t0,
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "preload": os.environ.get("LD_PRELOAD", "")}
    write_json(path, "mlx_fp4_rows", data, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: what a quantized KV cache costs on the default model, next to what the weights' quantization costs.

Rows per weight set (an MLX directory made by ``mlx_lm.convert``: fp16, and 4-bit affine g64 = mlx_lm's default
``-q``), scored through ``mlx_lm.load`` in ``--context``-token windows: the float-KV row and one row per
``--kv-bits`` with mlx_lm's ``QuantizedKVCache`` (``macq eval MLX_DIR --kv-bits 8 --kv-bits 4``); KL / top-1 of a
KV row are against the float-KV row of the same weights. The weights' own cost is the float-KV row's KL against
the fp16 weights (same windows). The same KV rows are also computed in torch on the float checkpoint (``macq eval
--kv-bits`` on a checkpoint: MLX's affine KV grid simulated in a transformers cache) to show the simulation
agrees with mlx_lm's cache at this scale.

    python scripts/bench.py kv_rows --work /tmp/macq-kv --json kv.json      # OpenBLAS preloaded for mlx speed

Caveat: the default model's linear weights are dequantized Q4_1 (see PLATFORM.md), so the 4-bit weight row
sits unusually close to its source; the KV rows do not depend on it (keys and values are activations).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

DATASETS = ("wiki", "c4")


def build(work: Path) -> None:
    from compare_mlx import rope_patched_copy
    from mlx_lm.convert import convert

    from macq.models import default_model_dir

    work.mkdir(parents=True, exist_ok=True)
    hf = rope_patched_copy(default_model_dir(), work)
    if not (work / "fp16" / "config.json").is_file():
        convert(str(hf), str(work / "fp16"), dtype="float16")
    if not (work / "affine4-g64" / "config.json").is_file():
        convert(str(hf), str(work / "affine4-g64"), quantize=True, q_bits=4, q_group_size=64, dtype="float16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/macq-kv")
    ap.add_argument("--kv-bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    from mlx_fp4_rows import load_dequantized

    from macq.data import eval_tokens
    from macq.eval import reference_logprobs
    from macq.eval.kvsim import kv_logits_fn, kv_rows
    from macq.eval.measure import quality
    from macq.models import load_model
    from mlx_backend.runner import hf_tokenizer, logits_fn
    from mlx_backend.runner import kv_logits_fn as mlx_kv_fn

    work = Path(args.work)
    t_start = time.perf_counter()
    build(work)
    model, tok = load_model(None)
    model.eval()
    out: dict = {"rows": {}, "args": vars(args)}
    for ds in DATASETS:
        ids = eval_tokens(tok, ds, args.tokens)
        fp16 = load_dequantized(work / "fp16")
        fp16_lp = reference_logprobs(logits_fn(fp16), ids, args.context)
        for name in ("fp16", "affine4-g64"):
            loaded = fp16 if name == "fp16" else load_dequantized(work / name)
            assert hf_tokenizer(loaded[1]).vocab_size == tok.vocab_size
            t0 = time.perf_counter()
            rows = kv_rows(logits_fn(loaded), lambda b, ld=loaded: mlx_kv_fn(ld, b, 64), ids, tuple(args.kv_bits),
                           64, args.context)
            weights = quality(logits_fn(loaded), ids, fp16_lp, args.context)
            out["rows"][f"{name}/{ds}/mlx_lm"] = {"kv": rows, "weights_kl": weights["kl"].value,
                                                  "seconds": time.perf_counter() - t0}
            print(name, ds, json.dumps(rows), flush=True)
        t0 = time.perf_counter()
        rows = kv_rows(model, lambda b: kv_logits_fn(model, b, 64), ids, tuple(args.kv_bits), 64, args.context)
        out["rows"][f"float-checkpoint/{ds}/torch-sim"] = {"kv": rows, "seconds": time.perf_counter() - t0}
        print("torch-sim", ds, json.dumps(rows), flush=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    out.update(seconds=time.perf_counter() - t_start, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).parent).stdout.strip(),
               preload=os.environ.get("LD_PRELOAD", ""), load=os.getloadavg())
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

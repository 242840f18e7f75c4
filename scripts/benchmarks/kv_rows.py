#!/usr/bin/env python
"""Benchmark: what a quantized KV cache costs on the default model, next to what the weights' quantization costs.

Rows, each at ``--context`` tokens per window (the cache's error grows with the positions attended), KL / top-1
of a KV row against the float-KV row of the same weights:

* torch (``macq eval --kv-bits`` on a checkpoint or a macq quantization: MLX's affine KV grid simulated in a
  transformers cache), on wiki and c4, ``--tokens`` tokens: the float weights, and 4-bit affine g64 RTN weights
  (``mlx_lm.convert -q``'s algorithm) whose own cost is their float-KV row's KL against the float weights;
* mlx_lm (``macq eval MLX_DIR --kv-bits``: ``QuantizedKVCache``) on the fp16 MLX export of the same weights, on
  the first ``--mlx-tokens`` of wiki: the runtime's own numbers next to the simulation's on the same tokens
  (mlx's CPU quantized attention is slow here, so this check is one window).

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


def main() -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/macq-kv")
    ap.add_argument("--kv-bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--mlx-tokens", type=int, default=2048)
    ap.add_argument("--json", required=True)
    add_force(ap)
    args = ap.parse_args()
    check_json(args.json, args.force)
    import torch
    from compare_mlx import fp16_rounded
    from mlx_fp4_rows import load_dequantized

    from macq.data import eval_tokens
    from macq.eval import reference_logprobs
    from macq.eval.kvsim import kv_logits_fn, kv_rows
    from macq.eval.measure import quality
    from macq.models import load_model
    from macq.quantizers import quantize_model
    from macq.quantizers.rtn import RTNConfig
    from mlx_backend.runner import kv_logits_fn as mlx_kv_fn
    from mlx_backend.runner import logits_fn

    work = Path(args.work)
    t_start = time.perf_counter()
    out: dict = {"rows": {}, "args": vars(args)}

    def save() -> None:
        write_json(args.json, "kv_rows", out)

    model, tok = load_model(None)
    model = fp16_rounded(model).eval()                 # the fp16 values an MLX fp16 export holds
    q4 = quantize_model(model, "rtn", RTNConfig(bits=4, group_size=64, zero_point="float"), source="default")
    weights = {"fp16": model, "affine4-g64": q4.to_torch().eval()}
    for ds in DATASETS:
        ids = eval_tokens(tok, ds, args.tokens)
        ref = reference_logprobs(model, ids, args.context)
        for name, net in weights.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                rows = kv_rows(net, lambda b, n=net: kv_logits_fn(n, b, 64), ids, tuple(args.kv_bits), 64,
                               args.context)
                w = quality(net, ids, ref, args.context)["kl"].value if name != "fp16" else 0.0
            out["rows"][f"{name}/{ds}/torch-sim"] = {"kv": rows, "weights_kl": w, "seconds": time.perf_counter() - t0}
            print(name, ds, "torch-sim", json.dumps(rows), flush=True)
            save()
    build(work)                                        # the fp16 MLX export (mlx_lm.convert) for the runtime check
    ids = eval_tokens(tok, "wiki", args.mlx_tokens)
    loaded = load_dequantized(work / "fp16")
    for runtime, base, make in (
            ("mlx_lm", logits_fn(loaded), lambda b: mlx_kv_fn(loaded, b, 64)),
            ("torch-sim", model, lambda b: kv_logits_fn(model, b, 64))):
        t0 = time.perf_counter()
        with torch.inference_mode():
            rows = kv_rows(base, make, ids, tuple(args.kv_bits), 64, args.context)
        out["rows"][f"fp16/wiki-{args.mlx_tokens}/{runtime}"] = {"kv": rows, "seconds": time.perf_counter() - t0}
        print("fp16 wiki", runtime, json.dumps(rows), flush=True)
        save()
    out.update(seconds=time.perf_counter() - t_start, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).parent).stdout.strip(),
               preload=os.environ.get("LD_PRELOAD", ""), load=os.getloadavg())
    save()


if __name__ == "__main__":
    main()

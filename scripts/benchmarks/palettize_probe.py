"""kmeans-cal's palettize stage on one linear, part by part (one thread): seconds and counted GFLOP/s of the
weighted exact k-means, the inverse-Hessian factor, the feedback assignment, the LUT refits and the output
errors, against the float32 GEMM probe of the same run.

The weight is random (normal, 0.02, rounded to bfloat16 as a checkpoint stores it), the Hessian that of
correlated random inputs (1.5× as many tokens as inputs), the importances uniform: time and rate are real,
the errors are not a model's. Shapes default to the Llama-3.2-1B linears (q/o, gate/up, down).

    python scripts/bench.py palettize_probe --shapes 2048x2048 8192x2048 2048x8192 --json probe.json
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager

import torch

PARTS = {"kmeans": ("macq.quantizers.palettize", "quantize_weight"), "factor": ("macq.quantizers.kmeans_cal", "lut_hinv"),
         "assign": ("macq.quantizers.kmeans_cal", "lut_gptq"), "refit": ("macq.quantizers.kmeans_cal", "refit_lut"),
         "error": ("macq.quantizers.kmeans_cal", "output_error")}


@contextmanager
def timed_parts(seconds: dict[str, float], calls: dict[str, int]):
    """Wrap each part's function so that every call adds its time (and runs in its own stage for the counts)."""
    import importlib

    from macq.progress import stage

    saved = []
    for part, (mod_name, fn_name) in PARTS.items():
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)

        def wrapped(*a, _fn=fn, _part=part, **k):
            t0 = time.perf_counter()
            with stage(_part):
                out = _fn(*a, **k)
            seconds[_part] = seconds.get(_part, 0.0) + time.perf_counter() - t0
            calls[_part] = calls.get(_part, 0) + 1
            return out
        saved.append((mod, fn_name, fn))
        setattr(mod, fn_name, wrapped)
    try:
        yield
    finally:
        for mod, fn_name, fn in saved:
            setattr(mod, fn_name, fn)


def probe_linear(out: int, n: int, seed: int = 0) -> dict:
    from macq.progress import StageTimes
    from macq.quantizers import kmeans_cal as kc

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, n, generator=g) * 0.02).bfloat16().float()
    x = torch.randn(n + n // 2, n, generator=g)
    H = (x.T @ x / x.shape[0]).double()
    del x
    imp = torch.rand(out, n, generator=g)
    kc.palettize_linear(w[:16, :64], H[:64, :64], imp[:16, :64], kc.KMeansCalConfig())   # imports, first calls
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    timer = StageTimes("cpu")
    t0 = time.perf_counter()
    with timer, timed_parts(seconds, calls):
        _, info = kc.palettize_linear(w, H, imp, kc.KMeansCalConfig())
    total = time.perf_counter() - t0
    parts = {p: {"seconds": round(s, 2), "calls": calls[p], "gflop": round(timer.flops.get(p, 0) / 1e9, 1),
                 "gflop_s": round(timer.flops.get(p, 0) / 1e9 / s, 1)} for p, s in seconds.items()}
    flops = sum(timer.flops.values())
    return {"shape": [out, n], "seconds": round(total, 2), "gflop": round(flops / 1e9, 1),
            "gflop_s": round(flops / 1e9 / total, 1), "refits": info["refit"], "parts": parts}


def _shape(text: str) -> tuple[int, int]:
    try:
        out, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes {text!r}: expected OUTxIN, e.g. 2048x8192") from None
    if out < 1 or n < 1:
        raise ValueError(f"--shapes {text!r}: expected positive sizes")
    return out, n


def main() -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["2048x2048", "8192x2048", "2048x8192"], help="OUTxIN each")
    ap.add_argument("--json", default=None, help="also write the results here (a new file, or one this script wrote)")
    add_force(ap)
    args = ap.parse_args()
    try:                                   # bad input: one line, before any slow work
        shapes = [_shape(s) for s in args.shapes]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    check_json(args.json, args.force)
    torch.set_num_threads(1)
    from macq.perf import gemm_probe

    result = {"probe_gflop_s": round(gemm_probe()[0], 1), "linears": []}
    print(f"float32 GEMM probe: {result['probe_gflop_s']} GFLOP/s (one thread)")
    for out, n in shapes:
        r = probe_linear(out, n)
        result["linears"].append(r)
        rate = r["gflop_s"] / result["probe_gflop_s"]
        print(f"{out}x{n}: {r['seconds']} s, {r['gflop']} GFLOP, {r['gflop_s']} GFLOP/s ({rate:.0%} of the probe), "
              f"{r['refits']} refit(s)")
        for p, v in r["parts"].items():
            print(f"    {p:7s} {v['seconds']:7.2f} s  {v['calls']} call(s)  {v['gflop']:8.1f} GFLOP  {v['gflop_s']:6.1f} GFLOP/s")
    if args.json:
        write_json(args.json, "palettize_probe", result)


if __name__ == "__main__":
    main()

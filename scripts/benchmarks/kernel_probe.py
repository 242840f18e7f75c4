"""The kernels behind the calibrated methods' stage rates, each against its alternative in one run (one thread).

* the Cholesky factor of an n×n Hessian: SciPy's ``potrf`` (what GPTQ uses on the CPU) against torch's;
* the range search's ``x^2.4``: NumPy's ``log2``/``exp2`` (GPTQ's ``_pow24_``) against torch's ``log2``/``exp2``;
* AWQ's clip search on a weight: blocks of rows (``CLIP_ELEMENTS``) against the whole weight per candidate,
  with the picks compared.

    python scripts/bench.py kernel_probe --json probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cholesky(n: int) -> dict[str, float]:
    from macq.quantizers.gptq import _cholesky_lower

    x = torch.randn(2 * n, n)
    H = x.T @ x / (2 * n)
    t_scipy = _best(lambda: _cholesky_lower(H.clone()), 2)
    t_torch = _best(lambda: torch.linalg.cholesky_ex(H.clone()), 2)
    return {"n": n, "scipy_s": t_scipy, "torch_s": t_torch, "torch_over_scipy": t_torch / t_scipy}


def power(elements: int) -> dict[str, float]:
    from macq.quantizers.gptq import _pow24_

    w = torch.rand(elements) * 0.05
    t_numpy = _best(lambda: _pow24_(w.clone()))
    t_torch = _best(lambda: w.clone().log2_().mul_(2.4).exp2_())
    return {"elements": elements, "numpy_s": t_numpy, "torch_s": t_torch, "torch_over_numpy": t_torch / t_numpy}


def clip(out: int, n: int) -> dict[str, float]:
    from macq.quantizers import awq_search as S

    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, n, generator=g) * 0.02
    x = torch.randn(1024, n, generator=g)
    h = (x.T @ x).double()
    run = lambda: S.search_clip(w, h, 4, 128, False, torch.float16)  # noqa: E731
    blocked = run()
    t_blocked = _best(run, 2)
    default = S.CLIP_ELEMENTS
    S.CLIP_ELEMENTS = out * n                      # one block: every candidate over the whole weight
    try:
        whole = run()
        t_whole = _best(run, 2)
    finally:
        S.CLIP_ELEMENTS = default
    return {"out": out, "in": n, "blocked_s": t_blocked, "whole_s": t_whole,
            "blocked_over_whole": t_blocked / t_whole, "same_picks": bool(torch.equal(blocked, whole))}


def main(argv: list[str] | None = None) -> None:
    from outputs import add_force, check_json, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="Hessian size for the Cholesky row")
    ap.add_argument("--json", default=None)
    add_force(ap)
    args = ap.parse_args(argv)
    check_json(args.json, args.force)
    torch.set_num_threads(1)
    rows = {"cholesky": cholesky(args.n), "power": power(1 << 22),
            "clip": [clip(8192, 2048), clip(2048, 8192)]}
    print(json.dumps(rows, indent=1))
    if args.json:
        write_json(args.json, "kernel_probe", rows)


if __name__ == "__main__":
    main()

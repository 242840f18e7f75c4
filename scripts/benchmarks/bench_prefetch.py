"""A/B of the streamed reader's read-ahead (``macq.prefetch``): the same ``macq export --target mlx`` RTN run
with ``macq.streaming.PREFETCH_BYTES`` at its default and at 0 (reads inline, the previous behaviour),
interleaved, each as a child process, with the checkpoint's page cache in the same state before every child.

    python scripts/bench.py bench_prefetch /work/scratch/scale/llama-3.2-1b --out /work/scratch/ab --repeats 2 --cache cold

Prints one JSON line per run (wall s, CPU s, peak RSS from the child's ``wait4`` rusage) and the ratios
inline / prefetched of the medians. The export is the one ``scripts/benchmarks/bench_scale.py`` times against mlx_lm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import run_measured, set_cache  # noqa: E402

EXPORT = ["export", "{src}", "--target", "mlx", "--method", "rtn", "--bits", "4", "--group-size", "64", "--asymmetric",
          "--zero-point", "float", "--include-embeddings", "--include-lm-head", "--dtype", "float16", "-o", "{out}", "--force"]


def child(src: str, out: str, budget: int) -> None:
    import macq.streaming as streaming
    from macq.cli import main

    streaming.PREFETCH_BYTES = budget
    main([a.format(src=src, out=out) for a in EXPORT])


def main() -> None:
    from outputs import check_scratch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="scratch dir (new, or one this benchmark made)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", choices=["as-is", "cold", "warm"], default="cold")
    a = ap.parse_args()
    check_scratch(a.out, "bench-prefetch-scratch", inputs=(a.checkpoint,))
    import macq.streaming as streaming

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    runs: dict[int, list[dict]] = {0: [], streaming.PREFETCH_BYTES: []}
    for rep in range(a.repeats):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for budget in order:
            out = a.out / "export"
            shutil.rmtree(out, ignore_errors=True)
            set_cache(a.checkpoint, a.cache)
            load = [round(x, 1) for x in os.getloadavg()]
            r = run_measured([sys.executable, __file__, "--child", str(a.checkpoint), str(out), str(budget)], env,
                             a.out / f"child-{budget}.log")
            r.update(prefetch_bytes=budget, repeat=rep, cache=a.cache, load_before=load, at=time.strftime("%H:%M:%S"))
            runs[budget].append(r)
            print(json.dumps(r), flush=True)
    shutil.rmtree(a.out / "export", ignore_errors=True)
    med = {b: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_gib")} for b, rs in runs.items()}
    inline, ahead = med[0], med[streaming.PREFETCH_BYTES]
    print(json.dumps({"checkpoint": a.checkpoint.name, "cache": a.cache, "median_inline": inline, "median_prefetch": ahead,
                      "wall_ratio_inline_over_prefetch": round(inline["wall_s"] / ahead["wall_s"], 3)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:     # a measured child: SRC OUT BUDGET
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()

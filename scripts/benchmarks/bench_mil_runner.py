"""The MIL graph check's speed, old runner vs current, in one process on the same export (same machine state).

    python scripts/bench.py bench_mil_runner EXPORT [--old REV] [--repeats 2]

EXPORT is an ANE-graph Core ML export (one package or a chunk directory). ``--old REV`` names the git revision
whose ``converters/mil_runner.py`` is the anchor (default dc62960, before fp32 linear/matmul and cached
constants). Each runner does one untimed warm-up, then ``repeats`` timed 64-token prefill calls and as many
decode calls, alternating old and new; printed: median seconds per call and the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _old_runner(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:converters/mil_runner.py"], check=True,
                         capture_output=True, text=True).stdout
    f = Path(tempfile.mkdtemp()) / "mil_runner_old.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location("mil_runner_old", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _time(session, ids: np.ndarray) -> tuple[float, float]:
    session.reset()
    t0 = time.perf_counter()
    session.feed(ids)
    t1 = time.perf_counter()
    session.feed(ids[:1], prefill=False)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("--old", default="dc62960")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    import converters.mil_runner as current
    from converters.ane_runner import AneSession

    runners = {"old": _old_runner(a.old).run_program, "current": current.run_program}
    ids = np.arange(100, 100 + 64)
    sessions = {k: AneSession(a.export, backend="mil") for k in runners}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    for rep in range(a.repeats + 1):
        for k, fn in runners.items():
            current.run_program = fn               # AneSession._call looks it up at call time
            t = _time(sessions[k], ids)
            if rep:                                # rep 0 is the warm-up
                times[k].append(t)
    current.run_program = runners["current"]
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in times.items()}
    for k, (p, d) in med.items():
        print(f"{k:8s} prefill(64) {p:7.2f} s   decode {d:6.2f} s")
    print(f"ratio old/current: prefill {med['old'][0] / med['current'][0]:.2f}x, decode {med['old'][1] / med['current'][1]:.2f}x")


if __name__ == "__main__":
    main()

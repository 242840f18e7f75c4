"""The calibrated methods at real size, side by side with the reference tools in one run: wall time, CPU time
and peak RSS of each whole command, and macq's per-stage GEMM rates against the machine's probe.

    python scripts/bench.py make_shapes llama-3.2-1b /work/scratch/rs/1b-2l --layers 2
    python scripts/bench.py bench_realsize /work/scratch/rs/1b-2l --full-layers 16 --json realsize-1b.json

On one checkpoint, with the same calibration tokens (``--n-calib`` x ``--seq-len`` of ``--calib-dataset``, drawn
once by macq with seed 0; macq's CLI draws the same ones itself) and the same thread count (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and each tool's own setting), it runs in turn:

* ``macq-gptq``: ``macq quantize CKPT --method gptq --bits B --group-size G --stream --json`` (streamed, macq's
  defaults otherwise: true-sequential, MSE range search);
* ``llmc-gptq``: llm-compressor's ``oneshot`` + ``GPTQModifier`` (same bits, group, damping 0.01, block 128,
  sequential pipeline, batch 1) through macq's worker (:mod:`macq.baselines.llmc_worker`) with the reference
  venv's Python (``$MACQ_LLMC_VENV`` or ``.venv-llmc``: ``bash scripts/setup_reference_venv.sh``); the
  command includes loading the model (llm-compressor holds the whole model in float32);
* ``macq-awq``: ``macq quantize CKPT --method awq ... --stream --json``;
* ``mlx-awq``: ``mlx_lm.awq`` through ``scripts/benchmarks/mlx_lm_quant.py`` (the same ids handed over, the
  tool's own defaults otherwise: it also quantizes the embedding at 4 bits, group 32) with OpenBLAS preloaded
  (``--openblas``; PLATFORM.md, "Making mlx usable on this CPU").

Each command is a child process; wall time is the parent's clock, CPU time (user + system) and peak RSS are the
kernel's ``wait4`` accounting of the child (its waited-for descendants included; the peak is the largest single
process's high-water mark), and ``tree_peak_rss_gib`` is the largest sum of RSS over the process tree sampled
every 0.2 s (the two agree for these single-process tools). The load average is sampled during each command.
``--full-layers`` (the published depth) extrapolates a depth-cut checkpoint's times linearly: every decoder
layer has the same shapes, so per-layer time and peak memory are the full model's; the fixed costs (embedding,
capture, start-up) are counted once per layer too, so the extrapolation errs high.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TOOLS = ("macq-gptq", "llmc-gptq", "macq-awq", "mlx-awq")
MORE = ("macq-learned", "macq-kmeans-cal")   # by --tools only: no reference tool runs them
SCRATCH = "bench-realsize-scratch"
OPENBLAS = Path("/tmp/oblas/cmeel.prefix/lib/libopenblas.so.0")


class TreeSampler(threading.Thread):
    """Largest summed RSS of a process and its descendants, and the load average, sampled every 0.2 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.loads = pid, 0, []
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        n = 0
        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            if n % 10 == 0:
                self.loads.append(os.getloadavg()[0])
            n += 1
            self.stop.wait(0.2)


def run_measured(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> dict:
    """Run ``cmd``: wall time, CPU time, peak RSS (``wait4``), sampled tree RSS and load, and its stdout."""
    t0 = time.perf_counter()
    with open(log, "w") as err, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, cwd=cwd) as p:
        sampler = TreeSampler(p.pid)
        sampler.start()
        out = p.stdout.read() if p.stdout else b""
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if p.returncode != 0:    # the row says so and the other tools still run
        print(f"{' '.join(map(str, cmd))} failed ({p.returncode}); see {log}:\n{log.read_text()[-3000:]}",
              file=sys.stderr, flush=True)
    loads = sampler.loads or [os.getloadavg()[0]]
    return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_gib": round(ru.ru_maxrss / 2**20, 3), "tree_peak_rss_gib": round(sampler.peak / 2**30, 3),
            "load_mean": round(sum(loads) / len(loads), 2), "load_max": round(max(loads), 2),
            "returncode": p.returncode, "stdout": out.decode(errors="replace")}


def calib_ids(ckpt: Path, dataset: str, n: int, seq_len: int):
    from transformers import AutoTokenizer

    from macq.pipeline import calibration_ids

    return calibration_ids(AutoTokenizer.from_pretrained(str(ckpt)), dataset, n, seq_len, 0)


def commands(tool: str, a: argparse.Namespace, work: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one tool (its inputs written into ``work``)."""
    out = work / "out"
    if tool.startswith("macq-"):
        method = tool.split("-", 1)[1]
        grid = ["--bits", str(a.bits)] + (["--group-size", str(a.group_size)] if method != "kmeans-cal" else [])
        return [sys.executable, "-m", "macq.cli", "quantize", str(a.checkpoint), "--method", method, *grid,
                "--n-calib", str(a.n_calib),
                "--seq-len", str(a.seq_len), "--calib-dataset", a.calib_dataset, "--device", a.device, "--stream",
                "--json", "--force", "-o", str(out)], env
    if tool == "llmc-gptq":
        from safetensors.torch import save_file

        from macq.baselines.reference import WORKER, require_venv

        py = require_venv("gptq")
        save_file({"input_ids": a.ids.contiguous()}, str(work / "calib.safetensors"))
        (work / "request.json").write_text(json.dumps({
            "method": "gptq", "model_dir": str(a.checkpoint.resolve()), "bits": a.bits, "group_size": a.group_size,
            "symmetric": False, "damp": 0.01, "device": a.device, "threads": a.threads}))
        return [str(py), str(WORKER), str(work)], {**env, "PYTHONPATH": ""}
    if tool == "mlx-awq":
        import numpy as np

        np.save(work / "ids.npy", a.ids.numpy())
        e = dict(env)
        if a.openblas:      # its libgfortran / libquadmath sit next to it
            e["LD_PRELOAD"] = str(a.openblas)
            e["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(a.openblas.parent), e.get("LD_LIBRARY_PATH", "")]))
        return [sys.executable, str(Path(__file__).with_name("mlx_lm_quant.py")), "awq", "--model", str(a.checkpoint),
                "--calib", str(work / "ids.npy"), "--out", str(out), "--", "--bits", str(a.bits),
                "--group-size", str(a.group_size), "--num-samples", str(a.n_calib),
                "--sequence-length", str(a.seq_len)], e
    raise SystemExit(f"error: --tools {tool}: expected one of {', '.join(TOOLS + MORE)}")


def commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def main() -> None:
    from outputs import add_force, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS + MORE)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--n-calib", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-dataset", default="c4")
    ap.add_argument("--threads", type=int, default=1, help="threads of every tool")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where macq and llm-compressor calibrate (mlx_lm.awq runs on MLX's CPU build here)")
    ap.add_argument("--full-layers", type=int, default=None,
                    help="the published depth, to extrapolate a depth-cut checkpoint's totals (default: its own)")
    ap.add_argument("--openblas", type=Path, default=OPENBLAS if OPENBLAS.exists() else None,
                    help="libopenblas.so.0 to preload for mlx (PLATFORM.md); default the scratch one if present")
    ap.add_argument("--out", type=Path, default=Path("/tmp/macq-bench-realsize"),
                    help="scratch dir (a new one, or one this script made; each row's files deleted after it)")
    ap.add_argument("--json", type=Path, default=None, help="results (a new file, or one this script wrote)")
    add_force(ap)
    a = ap.parse_args()
    check_outputs(a)
    cfg = json.loads((a.checkpoint / "config.json").read_text())
    layers = int(cfg["num_hidden_layers"])
    full = a.full_layers or layers
    t = str(a.threads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t)
    a.ids = calib_ids(a.checkpoint, a.calib_dataset, a.n_calib, a.seq_len)
    meta = {"checkpoint": str(a.checkpoint), "layers": layers, "full_layers": full, "tokens": list(a.ids.shape),
            "calib_dataset": a.calib_dataset, "threads": a.threads, "bits": a.bits, "group_size": a.group_size,
            "commit": commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "openblas": str(a.openblas or ""), "device": a.device, "argv": sys.argv[1:]}
    rows = []
    for tool in a.tools:
        work = a.out / tool
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cmd, e = commands(tool, a, work, env)
        print(f"{tool}: load {os.getloadavg()}", file=sys.stderr, flush=True)
        m = run_measured(cmd, e, a.out / f"{tool}.log")
        stdout = m.pop("stdout")
        row = {"tool": tool, **m, "per_layer_s": round(m["wall_s"] / layers, 2),
               "full_model_s_est": round(m["wall_s"] * full / layers, 1),
               "command": " ".join(map(str, cmd)).replace(str(ROOT) + "/", "")}
        if m["returncode"] != 0:
            row["failed"] = (a.out / f"{tool}.log").read_text()[-500:]
        elif tool.startswith("macq-"):
            res = json.loads(stdout)
            row["timings"], row["gemm"] = res.get("timings"), res.get("gemm")
            row["peak_cuda_bytes"] = (res.get("memory") or {}).get("peak_cuda_bytes")
        elif tool == "llmc-gptq":
            row["library_s"] = round(json.loads((work / "result.json").read_text())["seconds"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(work, ignore_errors=True)
        if a.json:           # after every row: a later failure or interruption keeps the finished ones
            write_json(a.json, "bench_realsize", {"meta": meta, "rows": rows})
    print(table(rows, meta))


def check_outputs(a: argparse.Namespace) -> None:
    """Bad input ends in one ``error:`` line and exit 2 before any work: a checkpoint without config.json, a
    --json path that is not this script's file (or is, without --force), a --out directory it did not make."""
    from outputs import check_json, check_scratch

    if not (a.checkpoint / "config.json").is_file():
        print(f"error: checkpoint {a.checkpoint}: no config.json", file=sys.stderr)
        raise SystemExit(2)
    check_json(a.json, a.force, inputs=(a.checkpoint,))
    check_scratch(a.out, SCRATCH, inputs=(a.checkpoint, a.json))


def table(rows: list[dict], meta: dict) -> str:
    """The results page's tables: one row per tool, then macq's stages with their GEMM rates."""
    n, full = meta["layers"], meta["full_layers"]
    lines = [f"| tool | wall s | CPU s | peak RSS GiB | wall s per layer | est. {full}-layer wall s | load (mean/max) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['tool']} | failed (exit {r['returncode']}) | | | | | |")
            continue
        lines.append(f"| {r['tool']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_gib']} | {r['wall_s'] / n:.1f} | "
                     f"{r['full_model_s_est']} | {r['load_mean']}/{r['load_max']} |")
    for r in rows:
        g = r.get("gemm")
        if not g:
            continue
        lines += ["", f"{r['tool']}: probe {g['probe_cpu_gflop_s']} GFLOP/s float32, {g['probe_f64_cpu_gflop_s']} "
                  f"float64 per CPU-second ({g['probe_gflop_s']} / {g['probe_f64_gflop_s']} by the wall clock; "
                  f"{g['threads']} thread)", "",
                  "| stage | wall s | CPU s | GFLOP (float64) | GFLOP/s per CPU-s | of float32 probe | of machine |",
                  "|---|---|---|---|---|---|---|"]
        for k, s in g.get("unrated", {}).items():
            lines.append(f"| {k} (no products) | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} | | | | |")
        for k, s in g["stages"].items():
            lines.append(f"| {k} | {s['seconds']:.1f} | {s.get('cpu_seconds', 0):.1f} | {s['gflop']:.0f} "
                         f"({s['gflop_f64']:.0f}) | {s.get('cpu_gflop_s', '')} | {s.get('of_probe_cpu', '')} | "
                         f"{s.get('of_machine_cpu', '')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

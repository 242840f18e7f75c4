"""Real-size cost of the calibrated methods on the streaming path: wall time, peak RSS and the time
split per stage of ``macq quantize SRC --method M --stream`` on a checkpoint, for every calibrated method that
streams (gptq, awq, awq-gptq, kmeans-cal, learned, smoothquant, mixed; kmeans-cal with ``--sensitivity hessian``,
learned with ``--kl-steps 0`` and mixed with ``--sensitivity proxy``: their whole-model defaults do not stream).

    python scripts/bench.py bench_scale_calib ~/.cache/macq/models/SmolLM2-135M-Instruct --n-calib 4 --seq-len 128
    python scripts/bench.py bench_scale_calib /work/scratch/scale/llama-3.2-1b --methods gptq awq --n-calib 32 \
        --seq-len 512 --json bench.json

Each run is a child process (``python -m macq.cli quantize ... --json``) with ``OMP_NUM_THREADS`` set; wall
time is taken by the parent, peak RSS is the child's own ``wait4`` rusage (the kernel's high-water mark of
that process, nothing sampled); the time split (``timings``: Hessian / statistics accumulation, Cholesky,
GPTQ column loop, AWQ search and rounding, layer forward, I/O) and the activation store's counts come from
the child's ``--json`` result. Per-layer times are the split divided by the number of decoder layers, the
basis for extrapolating to a larger shape. ``--in-memory`` also runs the old path (``--no-stream``, whole
model in float32) for the peak-RSS comparison, and with float32 activations (the default) checks that both give the
same records bit for bit. Numbers are meaningful as ratios measured in the same run: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``cmd``; wall time, the child's peak RSS (GiB) and its stdout parsed as JSON."""
    t0 = time.perf_counter()
    with open(log, "w") as err, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err) as p:
        out = p.stdout.read() if p.stdout else b""
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(ru.ru_maxrss / 2**20, 3), "result": json.loads(out)}


def n_layers(src: Path) -> int:
    cfg = json.loads((src / "config.json").read_text())
    return int(cfg.get("num_hidden_layers") or cfg.get("n_layer"))


def same_records(a: Path, b: Path) -> bool:
    """Records bit for bit, float tensors by value (the streamed path may keep a checkpoint's narrower dtype
    where it holds the value exactly), and the act-quant metadata."""
    import torch

    from macq.qmodel import QuantizedModel

    qa, qb = QuantizedModel.load(a), QuantizedModel.load(b)
    if set(qa.records) != set(qb.records) or set(qa.float_tensors) != set(qb.float_tensors):
        return False
    if qa.act_quant != qb.act_quant:
        return False
    for k in qa.records:
        ta, tb = qa.records[k].to_tensors(), qb.records[k].to_tensors()
        if ta.keys() != tb.keys() or not all(torch.equal(ta[f], tb[f]) for f in ta):
            return False
    return all(torch.equal(qa.float_tensors[k].float(), qb.float_tensors[k].float()) for k in qa.float_tensors)


def main() -> None:
    from outputs import add_force, check_json, check_scratch, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--methods", nargs="+", default=["gptq"], choices=list(METHOD_ARGS))
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--n-calib", default="32")
    ap.add_argument("--seq-len", default="512")
    ap.add_argument("--calib-dataset", default="c4")
    ap.add_argument("--target-bpw", default="4.25", help="mixed: the bits-per-weight budget")
    ap.add_argument("--act-dtype", default=None, help="float32 (macq's default) | float16 | bfloat16")
    ap.add_argument("--max-memory", default=None, help="activation budget, e.g. 512MiB")
    ap.add_argument("--device", default=None, help="cpu | cuda | mps (any calibrated method)")
    ap.add_argument("--in-memory", action="store_true", help="also run --no-stream (whole model in float32)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children")
    ap.add_argument("--out", type=Path, default=Path("/tmp/macq-bench-calib"), help="scratch dir (deleted per row)")
    ap.add_argument("--json", type=Path, default=None)
    add_force(ap)
    a = ap.parse_args()
    check_json(a.json, a.force, inputs=(a.checkpoint,))
    check_scratch(a.out, "bench-scale-calib-scratch", inputs=(a.checkpoint, a.json))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    layers = n_layers(a.checkpoint)
    rows = []
    for method in a.methods:
        base = [sys.executable, "-m", "macq.cli", "quantize", str(a.checkpoint), "--method", method,
                *METHOD_ARGS[method](a), "--n-calib", a.n_calib, "--seq-len", a.seq_len,
                "--calib-dataset", a.calib_dataset, "--json", "--force"]
        if a.device and method == "gptq":
            base += ["--device", a.device]
        streamed = base + ["--stream"] + (["--act-dtype", a.act_dtype] if a.act_dtype else []) \
            + (["--max-memory", a.max_memory] if a.max_memory else [])
        runs = [("streamed", streamed)] + ([("in-memory", base + ["--no-stream"])] if a.in_memory else [])
        outs = {}
        for kind, cmd in runs:
            out = a.out / f"{a.checkpoint.name}-{method}-{kind}"
            print(f"{method} {kind}: load {os.getloadavg()}", file=sys.stderr, flush=True)
            m = run_measured(cmd + ["-o", str(out)], env, a.out / f"{method}-{kind}.log")
            res = m.pop("result")
            t = res.get("timings", {})
            row = {"checkpoint": a.checkpoint.name, "method": method, "path": kind, **m,
                   "timings": t, "per_layer_s": {k: round(v / layers, 3) for k, v in t.items()},
                   "activations": res.get("activations"), "bits_per_weight": res.get("bits_per_weight"),
                   "layers": layers, "command": " ".join(cmd[2:] + ["-o", str(out)])}
            rows.append(row)
            outs[kind] = out
            print(json.dumps(row), flush=True)
        if len(outs) == 2:
            rows[-1]["records_identical_to_streamed"] = same_records(outs["streamed"], outs["in-memory"])
            print(f"records identical: {rows[-1]['records_identical_to_streamed']}", flush=True)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    print("\n| method | path | wall s | peak RSS GiB | " + " | ".join(TIMING_COLS) + " |")
    print("|---|---|---|---|" + "---|" * len(TIMING_COLS))
    for r in rows:
        print(f"| {r['method']} | {r['path']} | {r['wall_s']} | {r['peak_rss_gib']} | "
              + " | ".join(str(r["timings"].get(c, "")) for c in TIMING_COLS) + " |")
    if a.json:
        write_json(a.json, "bench_scale_calib", rows)


TIMING_COLS = ("hessian_s", "stats_s", "sensitivity_s", "cholesky_s", "column_loop_s", "palettize_s", "target_s",
               "search_s", "tune_s", "round_s", "forward_s", "io_s", "capture_s", "total_s")


def _affine(a: argparse.Namespace) -> list[str]:
    return ["--bits", a.bits, "--group-size", a.group_size]


# each method's options: kmeans-cal (group size = output channels per LUT, its default 16) with Hessian sensitivities
# and learned without the logits stage, the settings that stream; smoothquant is W8A8 (no --bits); mixed allocates
# --target-bpw from the Hessian proxy (a first streamed pass), then rounds with RTN
METHOD_ARGS = {"gptq": _affine, "awq": _affine, "awq-gptq": _affine,
               "kmeans-cal": lambda a: ["--bits", a.bits, "--sensitivity", "hessian"],
               "learned": lambda a: [*_affine(a), "--kl-steps", "0"],
               "smoothquant": lambda a: [],
               "mixed": lambda a: ["--target-bpw", a.target_bpw, "--sensitivity", "proxy"]}


if __name__ == "__main__":
    main()

"""Real-size cost benchmark: macq's streamed RTN export vs ``mlx_lm.convert`` on the same checkpoint.

    python scripts/bench.py make_shapes llama-3.2-1b /work/scratch/scale/llama-3.2-1b     # once per shape
    python scripts/bench.py bench_scale /work/scratch/scale/llama-3.2-1b /work/scratch/scale/llama-3.2-3b \
        --out /work/scratch/scale/bench --json bench.json

For each checkpoint, in the same minute and one after the other (never concurrently), it runs

* ``macq export SRC --target mlx --method rtn --bits 4 --group-size 64 --asymmetric --zero-point float
  --include-embeddings --include-lm-head`` (MLX's own affine algorithm, embeddings quantized too: the same
  work ``mlx_lm.convert -q`` does), and
* ``mlx_lm.convert --hf-path SRC -q --q-bits 4 --q-group-size 64 --dtype float16``,

each as a child process, measuring wall time, the child's CPU time (user + system: more than the wall time
means more than one busy thread) and its peak RSS (``wait4`` rusage: the kernel's high-water mark of that
process, nothing sampled). ``--repeats`` alternates the order. ``--cache`` sets the page-cache state of the
checkpoint before *each* child, so that the order cannot favour either tool: ``cold`` evicts its files
(``posix_fadvise(DONTNEED)``: the case of a checkpoint not read recently, and of one larger than the free memory),
``warm`` reads them once (just read), ``as-is`` leaves whatever the previous child left. Every child starts after
a ``sync``, so neither pays for the other's write-back. It then compares the
two outputs tensor by tensor (how many are byte-identical) and optionally loads macq's export in
``mlx_lm.load`` and generates a few tokens. Numbers are only meaningful as ratios measured in the same run: the
machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({rc}); see {log}:\n{log.read_text()[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_gib": round(ru.ru_maxrss / 2**20, 3)}


def set_cache(ck: Path, state: str) -> None:
    """Put the checkpoint's files in the page-cache ``state`` (see the module docstring); Linux only."""
    os.sync()
    if state == "as-is":
        return
    for f in sorted(ck.iterdir()):
        if not f.is_file():
            continue
        if state == "cold":
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        else:
            with open(f, "rb", buffering=0) as fh:
                buf = bytearray(1 << 24)
                while fh.readinto(buf):
                    pass


def compare(a: Path, b: Path) -> dict:
    import torch

    from macq.shards import TensorStore

    sa, sb = TensorStore.open(a), TensorStore.open(b)
    same = sum(1 for k in sa if k in sb and sa.shape(k) == sb.shape(k) and torch.equal(sa[k], sb[k]))
    return {"tensors": len(sa), "identical": same, "keys_equal": set(sa) == set(sb)}


def mem_available_gib() -> float:
    """MemAvailable (what can be allocated without swapping, page cache included), GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return float("nan")


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def generate(path: Path, n: int) -> dict:
    """Load the export with ``mlx_lm.load`` and greedily generate ``n`` tokens. Off Apple silicon the floating
    parameters (scales, biases, norms) are upcast to float32 after loading (exact; codes untouched): mlx's CPU
    build has no fp16 arithmetic, and its fp16 quantized matmul is ~40x slower (mlx_backend.runner)."""
    from mlx_lm import stream_generate

    from mlx_backend.runner import default_compute_dtype, load_mlx

    t0 = time.perf_counter()
    dtype = default_compute_dtype()
    model, tok = load_mlx(path, dtype)
    t1 = time.perf_counter()
    steps = list(stream_generate(model, tok, prompt="The capital of France is", max_tokens=n))
    t2 = time.perf_counter()
    return {"load_s": round(t1 - t0, 1), "generate_s": round(t2 - t1, 1), "compute_dtype": dtype or "stored",
            "tokens": [r.token for r in steps],
            "text": "".join(r.text for r in steps),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def main() -> None:
    from outputs import add_force, check_json, check_scratch, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="scratch dir for the exports (deleted per row)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep macq's last export (for --generate)")
    ap.add_argument("--generate", type=int, default=0,
                    help="load macq's export of the last checkpoint in mlx_lm and generate N tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS for both children (torch ops; MLX's CPU ops run on their own pool)")
    ap.add_argument("--skip-mlx", action="store_true")
    ap.add_argument("--cache", choices=["as-is", "cold", "warm"], default="as-is",
                    help="page-cache state of the checkpoint before each child (cold/warm: Linux)")
    ap.add_argument("--generate-only", type=Path, default=None, help="just load this MLX dir and generate")
    ap.add_argument("--json", type=Path, default=None)
    add_force(ap)
    a = ap.parse_args()
    if a.generate_only is not None:
        print(json.dumps(generate(a.generate_only, a.generate or 8)))
        return
    check_json(a.json, a.force, inputs=tuple(a.checkpoints))
    check_scratch(a.out, "bench-scale-scratch", inputs=(*a.checkpoints, a.json))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    py = sys.executable
    rows = []
    for ck in a.checkpoints:
        macq_out, mlx_out = a.out / f"{ck.name}-macq", a.out / f"{ck.name}-mlxlm"
        macq_cmd = [py, "-m", "macq.cli", "export", str(ck), "--target", "mlx", "--method", "rtn", "--bits", "4",
                    "--group-size", "64", "--asymmetric", "--zero-point", "float", "--include-embeddings",
                    "--include-lm-head", "--dtype", "float16", "-o", str(macq_out), "--force"]
        mlx_cmd = [py, "-m", "mlx_lm", "convert", "--hf-path", str(ck), "--mlx-path", str(mlx_out), "-q",
                   "--q-bits", "4", "--q-group-size", "64", "--dtype", "float16"]
        src_bytes = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
        for rep in range(a.repeats):
            free_gib = mem_available_gib()
            print(f"available memory before {ck.name}: {free_gib} GiB; load {os.getloadavg()}", file=sys.stderr)
            order = [("macq", macq_cmd, macq_out), ("mlx_lm", mlx_cmd, mlx_out)]
            if rep % 2:
                order.reverse()
            res = {}
            for name, cmd, out in order:
                if name == "mlx_lm" and a.skip_mlx:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                set_cache(ck, a.cache)
                print(f"[{time.strftime('%H:%M:%S')}] {ck.name} {name} ({a.cache}) ...", file=sys.stderr, flush=True)
                res[name] = run_measured(cmd, env, a.out / f"{ck.name}-{name}.log")
                res[name]["out_bytes"] = dir_bytes(out)
                print(f"  {res[name]}", file=sys.stderr, flush=True)
            row = {"checkpoint": ck.name, "source_gib": round(src_bytes / 2**30, 2), "repeat": rep, **{
                f"{k}_{m}": v for k, r in res.items() for m, v in r.items()}}
            row["free_gib_before"], row["load_before"] = free_gib, [round(x, 1) for x in os.getloadavg()]
            row["cache"] = a.cache
            if "mlx_lm" in res:
                row["rss_ratio"] = round(res["macq"]["peak_rss_gib"] / res["mlx_lm"]["peak_rss_gib"], 3)
                row["wall_ratio"] = round(res["macq"]["wall_s"] / res["mlx_lm"]["wall_s"], 3)
                row.update({f"cmp_{k}": v for k, v in compare(macq_out, mlx_out).items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
        shutil.rmtree(mlx_out, ignore_errors=True)
        if a.generate and ck == a.checkpoints[-1]:
            rows[-1]["generate"] = generate(macq_out, a.generate)
            print(json.dumps(rows[-1]["generate"]), flush=True)
        if not (a.keep and ck == a.checkpoints[-1]):
            shutil.rmtree(macq_out, ignore_errors=True)
    if a.json:
        write_json(a.json, "bench_scale", rows)


if __name__ == "__main__":
    main()

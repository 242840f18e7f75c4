"""``scripts/benchmarks/bench_quality.py --runtime mlx``: every row is an MLX directory made by a child process and scored
through ``mlx_lm.load`` (mlx's forward, float32 arithmetic on the stored fp16 values).

* macq rows (``rtn``, ``awq``, ``gptq``, ``learned``, ...): ``macq quantize`` in a child process (the CLI a user
  runs, on the same calibration ids: the CLI and the benchmark both draw them with ``calibration_samples``),
  then macq's MLX exporter (records copied bit-exactly) in this process;
* mlx-lm rows (``mlx-convert``, ``mlx-awq``, ``mlx-gptq``, ``mlx-dwq``): ``scripts/benchmarks/mlx_lm_quant.py`` in a child
  process, i.e. the tool's own ``main()`` fed the benchmark's calibration ids (see that script).

Wall time, CPU time and peak RSS are those of the child (``os.wait4``'s rusage), so every row is measured the
same way and the benchmark process's own memory (reference log-probs, the torch model) is not counted.
A child that fails leaves a row with its exit code and the last lines it printed (e.g. ``mlx_lm.gptq`` at 3 bits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MLX_TOOLS = {"mlx-convert": "convert", "mlx-awq": "awq", "mlx-gptq": "gptq", "mlx-dwq": "dwq"}
PY = sys.executable


def run_child(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` with stdout+stderr to ``log``; wall seconds, CPU seconds and peak RSS of that child alone."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t0
    tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    return {"cmd": cmd, "rc": os.waitstatus_to_exitcode(status), "seconds": secs, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_mib": ru.ru_maxrss / 1024, "tail": [ln for ln in tail if ln.strip()][-12:]}


def cli_flags(opts: dict[str, Any]) -> list[str]:
    """macq CLI flags for a method's option dict (``symmetric=False`` -> ``--asymmetric``)."""
    out: list[str] = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if k == "symmetric":
            out.append("--symmetric" if v else "--asymmetric")
        elif isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


def macq_cmd(method: str, opts: dict[str, Any], args, out: Path) -> list[str]:
    """``macq quantize`` of the default model (or ``args.model``, a local HF dir: the tests' tiny model)."""
    from macq.quantizers import method_spec

    macq = str(Path(PY).with_name("macq"))
    model = [str(args.model)] if getattr(args, "model", None) else []
    calib = ["--calib-dataset", args.calib_dataset, "--n-calib", str(args.n_calib), "--seq-len", str(args.seq_len),
             "--seed", "0"] if method_spec(method).needs_calibration else []   # the CLI refuses them otherwise
    return [macq, "quantize", *model, "--method", method, *cli_flags(opts), *calib, "--no-stream", "-o", str(out)]


def tool_cmd(row: str, args, hf_dir: Path, ids_path: Path, out: Path) -> list[str]:
    """The child command of an mlx-lm row: every row quantizes the decoder linears *and* the tied embedding at
    ``--bits`` / ``--group-size`` (awq: ``--embed-bits``; gptq: ``--fallback-bits``; convert and dwq do it)."""
    tool = MLX_TOOLS[row]
    b, g = str(args.bits), str(args.group_size)
    base = [PY, str(Path(__file__).with_name("mlx_lm_quant.py")), tool, "--model", str(hf_dir), "--out", str(out)]
    if tool == "convert":
        return [*base, "--bits", b, "--group-size", g]
    base += ["--calib", str(ids_path)]
    n, L = str(args.n_calib), str(args.seq_len)
    if tool == "awq":
        return [*base, "--", "--bits", b, "--group-size", g, "--embed-bits", b, "--embed-group-size", g,
                "--num-samples", n, "--sequence-length", L]
    if tool == "gptq":
        return [*base, "--", "--bits", b, "--group-size", g, "--fallback-bits", b, "--fallback-group-size", g,
                "--num-samples", n, "--sequence-length", L]
    return [*base, "--dwq-valid", str(args.kl_holdout), "--dwq-repeat", str(args.dwq_repeat), "--", "--bits", b,
            "--group-size", g, "--num-samples", n, "--max-seq-length", L, "--batch-size", str(args.kl_batch),
            "--learning-rate", str(args.dwq_lr)]


def same_settings(qdir: Path, method: str, opts: dict[str, Any], args) -> bool:
    """A macq quantization directory can stand for a row only if its manifest records exactly the config and
    calibration this row would use (the config built from ``opts`` the way the CLI builds it)."""
    from macq.pipeline import config_for

    try:
        m = json.loads((qdir / "manifest.json").read_text())["method"]
    except (OSError, KeyError, ValueError):
        return False
    from macq.quantizers import method_spec

    want = config_for(method, dict(opts)).to_dict()
    calib = {"dataset": args.calib_dataset, "n_calib": args.n_calib, "seq_len": args.seq_len, "seed": 0}
    same_calib = not method_spec(method).needs_calibration or m.get("calibration") == calib
    return m.get("method") == method and all(m.get(k) == v for k, v in want.items()) and same_calib


def mlx_file_size(path: Path) -> dict[str, float]:
    """Size of the MLX directory's weights and bits/weight of its quantized tensors: (packed codes + scales +
    biases) bits over the logical weights (groups x group size, read from config.json's ``quantization``)."""
    import mlx.core as mx

    cfg = json.loads((path / "config.json").read_text()).get("quantization", {})
    files = sorted(path.glob("model*.safetensors"))
    tensors: dict[str, Any] = {}
    for f in files:
        tensors.update(mx.load(str(f)))
    qbits, n = 0, 0
    for k in (k for k in tensors if k.endswith(".scales")):
        p = k[:-len(".scales")]
        q = cfg.get(p) if isinstance(cfg.get(p), dict) else cfg
        n += tensors[k].size * q["group_size"]
        qbits += sum(tensors[p + s].nbytes * 8 for s in (".weight", ".scales", ".biases") if p + s in tensors)
    return {"bpw": qbits / n if n else 16.0, "size_mib": sum(f.stat().st_size for f in files) / 2**20}


def export_macq(qdir: Path, mdir: Path) -> None:
    from macq.qmodel import QuantizedModel
    from mlx_backend import export_mlx

    export_mlx(QuantizedModel.load(qdir), mdir, tokenizer=qdir, dtype="float16", force=True)


def build_row(row: str, method: str | None, opts: dict[str, Any] | None, args, hf_dir: Path, ids_path: Path,
              work: Path) -> tuple[Path | None, dict[str, Any]]:
    """Make (or, with ``--reuse``, find) the row's MLX directory; returns it (None if the child failed) and the
    row's info: child command, exit code, seconds, CPU seconds, peak MiB, the child's last lines."""
    tag = f"{row}-{args.bits}b-g{args.group_size}"
    mdir, runfile = work / f"{tag}-mlx", work / f"{tag}.run.json"
    qdir = work / tag
    if args.reuse and runfile.exists() and (mdir / "config.json").exists():
        info = json.loads(runfile.read_text())
        if row in MLX_TOOLS and info.get("cmd") == tool_cmd(row, args, hf_dir, ids_path, mdir) or \
                row not in MLX_TOOLS and same_settings(qdir, method, opts, args):
            return mdir, {**info, "reused": True}
    import shutil

    shutil.rmtree(mdir, ignore_errors=True)
    if row in MLX_TOOLS:
        cmd = tool_cmd(row, args, hf_dir, ids_path, mdir)
    elif args.reuse and same_settings(qdir, method, opts, args) and runfile.exists():
        cmd = None                            # quantized earlier with the very same settings: only export
    else:
        cmd = macq_cmd(method, opts, args, qdir)
    if cmd is None:
        info = {**json.loads(runfile.read_text()), "reused": True}
    else:
        env_note = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        info = {**run_child(cmd, work / f"{tag}.log"), "env": env_note}
    if info["rc"] != 0:
        runfile.write_text(json.dumps(info, indent=1))
        return None, info
    if row not in MLX_TOOLS:
        t0 = time.perf_counter()
        export_macq(qdir, mdir)
        info["export_s"] = time.perf_counter() - t0
    runfile.write_text(json.dumps(info, indent=1))
    return mdir, info


def dense_mlx(loaded):
    """Replace every ``QuantizedLinear`` / ``QuantizedEmbedding`` of an ``mlx_lm.load``-ed model by the float layer
    holding ``mx.dequantize`` of its stored codes, scales and biases (mlx's own reading of the format), in place.

    Why: mlx's Linux CPU build has no fast quantized matmul (measured here: a 128-token forward of the 3-bit
    135M model took 26 s through ``quantized_matmul``, 1.0 s dense after dequantizing, logits equal to 2e-4), and
    the benchmark scores 3x1024 tokens per row. The forward is still mlx_lm's model code on the weights mlx
    decodes from the file; only the order of the fp32 arithmetic differs (tests/test_mlxcmp.py compares both)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    model = loaded[0]
    new = []
    for k, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            if isinstance(m, nn.QuantizedEmbedding):
                d = nn.Embedding(*w.shape)
            else:
                d = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                if "bias" in m:
                    d.bias = m.bias
            d.weight = w.astype(mx.float32)
            new.append((k, d))
    model.update_modules(tree_unflatten(new))
    mx.eval(model.parameters())
    return loaded

"""Driving llm-compressor (GPTQ, AWQ) in its own virtual environment, exchanging files only.

The venv is ``$MACQ_LLMC_VENV`` or ``.venv-llmc`` at the repository root, made by
``scripts/setup_reference_venv.sh``. macq draws the calibration ids, writes them and a request into a
work directory, runs :mod:`macq.baselines.llmc_worker` as a script with the venv's Python (PYTHONPATH and
VIRTUAL_ENV removed so nothing of macq's environment leaks in), and reads back the quantize-dequantized
weights. A missing venv or a failed worker is one line, before any model is loaded where possible.

llm-compressor ships no inference kernels of its own (its output is served by vLLM), so its weights are
evaluated as dense tensors in torch: quality numbers are the library's, latency is not a kernel figure
and is not reported for these rows.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from macq.errors import MacqError

LLMC_PIN = "llmcompressor==0.14.0.1"
ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("llmc_worker.py")


def venv_dir() -> Path:
    return Path(os.environ.get("MACQ_LLMC_VENV", ROOT / ".venv-llmc"))


def require_venv(runner: str) -> Path:
    """The reference venv's Python, or a one-line error saying how to make it."""
    py = venv_dir() / "bin" / "python"
    if not py.is_file():
        raise MacqError(f"--runner {runner} runs {LLMC_PIN} in its own venv, not found at {venv_dir()}: "
                        "create it with `bash scripts/setup_reference_venv.sh` (or set MACQ_LLMC_VENV)")
    return py


def run_worker(runner: str, request: dict[str, Any], calib: torch.Tensor, work: Path,
               timeout: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run one llm-compressor job; return ``(tensors, result)`` read from the files it wrote."""
    from safetensors.torch import load_file, save_file

    py = require_venv(runner)
    work.mkdir(parents=True, exist_ok=True)
    for f in ("weights.safetensors", "result.json", "error.txt"):
        (work / f).unlink(missing_ok=True)
    (work / "request.json").write_text(json.dumps(request, indent=1))
    save_file({"input_ids": calib.long().contiguous()}, str(work / "calib.safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    if request.get("device") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        proc = subprocess.run([str(py), str(WORKER), str(work)], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MacqError(f"--runner {runner}: llm-compressor worker did not finish within {timeout:.0f} s") from None
    (work / "worker.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not (work / "result.json").is_file():
        err = (work / "error.txt").read_text().strip() if (work / "error.txt").is_file() else \
            (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MacqError(f"--runner {runner}: llm-compressor worker failed ({err}); log: {work / 'worker.log'}")
    return load_file(str(work / "weights.safetensors")), json.loads((work / "result.json").read_text())


def layer_bits(tensors: dict[str, torch.Tensor], name: str, bits: int, symmetric: bool) -> tuple[int, int]:
    """``(stored bits, weights)`` of one layer as compressed-tensors' pack-quantized checkpoint stores it:
    ``bits``-bit codes, one 16-bit scale per group (the checkpoint's float dtype), and for asymmetric
    schemes one zero-point per group packed at ``bits`` (symmetric schemes store none). The in-memory
    fp32 scale / int8 zero tensors llm-compressor leaves on the module are not what ships."""
    w = tensors[name + ".weight"]
    groups = tensors[name + ".weight_scale"].numel()
    return w.numel() * bits + groups * 16 + (0 if symmetric else groups * bits), w.numel()


def layer_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The quantized linears: those that came back with a scale."""
    return sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))

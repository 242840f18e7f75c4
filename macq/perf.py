"""What the machine can do: a float32 GEMM-rate probe, and floating-point operation counts from shapes.

A stage's time alone does not say whether it is slow: 12 s of Hessian accumulation is fast on one core and
slow on a GPU. The probe measures the float32 matmul rate (GFLOP/s) of this process's device and thread
count on the shapes the calibrated stages run (a batch of tokens through a hidden-size linear, and the
``XᵀX`` Gram product), so :class:`macq.progress.StageTimes` can report each stage's achieved rate as a
fraction of what the same matmul library reaches here. The counts are exact for the matrix products that
dominate each stage (``2·m·k·n`` for an ``[m, k] @ [k, n]`` product) and leave out element-wise work, so a
stage dominated by element-wise or Python work shows a low rate: that is the point of reporting it.

The probes run once per process per (device, thread count, dtype) and cost about three seconds on one CPU core.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch
import torch.nn as nn

# [m, k] @ [k, n]: 4096 calibration tokens (8x512) through a 2048-wide linear (the Llama-3.2-1B hidden size), the
# shape whose rate the streamed stages should reach; float64 (GPTQ's Cholesky and column solve) on a smaller one
PROBE_SHAPES = {torch.float32: (4096, 2048, 2048), torch.float64: (2048, 2048, 2048)}
PROBE_REPEATS = 3


def matmul_flops(m: int, k: int, n: int) -> int:
    """Floating-point operations of an ``[m, k] @ [k, n]`` product (one multiply and one add per term)."""
    return 2 * m * k * n


def gemm_rate(device: str | torch.device = "cpu") -> float:
    """The float32 GEMM rate in GFLOP/s on ``device`` with the current ``torch.get_num_threads()``:
    the best of a few timed products of :data:`PROBE_SHAPES` (after one warm-up each). Cached per process
    per (device, thread count)."""
    return gemm_probe(device)[0]


def gemm_probe(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, float | None]:
    """``(wall GFLOP/s, GFLOP/s per CPU-second)`` of the probe in ``dtype`` (float32 or float64): the second
    divides the work by the process's CPU seconds over the thread count (what the threads reach while they
    run, whatever else the machine runs); ``None`` off the CPU. Cached per process per (device, thread
    count, dtype)."""
    return _probe(str(torch.device(device)), torch.get_num_threads(), dtype)


@lru_cache(maxsize=None)
def _probe(device: str, threads: int, dtype: torch.dtype) -> tuple[float, float | None]:
    from macq.device import synchronize

    dev = torch.device(device)
    best, best_cpu = 0.0, 0.0
    gen = torch.Generator().manual_seed(0)
    for m, k, n in (PROBE_SHAPES[dtype],):
        a = torch.randn(m, k, generator=gen, dtype=dtype).to(dev)
        b = torch.randn(k, n, generator=gen, dtype=dtype).to(dev)
        c = a @ b                     # warm-up: library initialisation, page faults of the output
        synchronize(dev)
        for _ in range(PROBE_REPEATS):
            t0, c0 = time.perf_counter(), time.process_time()
            c = torch.matmul(a, b, out=c)
            synchronize(dev)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            best = max(best, matmul_flops(m, k, n) / dt / 1e9)
            if dc > 0:
                best_cpu = max(best_cpu, matmul_flops(m, k, n) / (dc / threads) / 1e9)
        del a, b, c
    return best, (best_cpu or None) if dev.type == "cpu" else None


def module_flops(module: nn.Module, args: tuple, output: object) -> int:
    """Matmul operations of one finished forward of ``module``, from its shapes; 0 for modules whose work is
    counted at a finer level (a decoder layer is the sum of its linears and attention).

    * ``nn.Linear`` (and transformers' ``Conv1D``, weight ``[in, out]``): ``2·tokens·in·out``;
    * an attention module (class name ending in ``Attention`` with a config giving the head count and
      ``head_dim``): the two products ``QKᵀ`` and ``PV`` over the full ``s×s`` score matrix,
      ``4·batch·heads·s²·head_dim`` (the projections are its linears, counted on their own).
    """
    if isinstance(module, nn.Linear):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            return matmul_flops(x.numel() // module.in_features, module.in_features, module.out_features)
        return 0
    name = type(module).__name__
    if name == "Conv1D":
        x = args[0] if args else None
        w = getattr(module, "weight", None)
        if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.dim() == 2:
            return matmul_flops(x.numel() // w.shape[0], w.shape[0], w.shape[1])
        return 0
    if name.endswith("Attention"):
        out = output[0] if isinstance(output, (tuple, list)) else output
        cfg = getattr(module, "config", None)
        heads = getattr(cfg, "num_attention_heads", None)
        hd = getattr(module, "head_dim", None)
        if isinstance(out, torch.Tensor) and out.dim() == 3 and heads and hd:
            b, s = out.shape[0], out.shape[1]
            return 4 * b * int(heads) * s * s * int(hd)
    return 0

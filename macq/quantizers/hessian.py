"""Input Hessians ``H = 2/n·Σxxᵀ`` of a decoder layer's linears, the expensive half of GPTQ-style methods.

* :func:`gram_into` adds ``scale·XᵀX`` to ``H``. On the CPU it is BLAS ``syrk``, which computes one triangle
  (``n²·t`` operations instead of the ``2·n²·t`` of a general product), mirrored into ``H`` a block of rows at
  a time, so the only n×n temporary is the float32 triangle.
* :class:`HessianAccumulator` keeps the running mean over calibration batches.
* :func:`collect_hessians` runs a decoder layer over its calibration inputs with hooks on the named linears.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn as nn

from macq.perf import matmul_flops
from macq.progress import add_flops

ROWS = 1024          # rows of H updated at a time from the Gram triangle


class _StopForward(Exception):
    pass


@lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def blas_threads() -> Iterator[None]:
    """SciPy's BLAS / LAPACK on torch's thread count (its own default is every core, whatever the user set)."""
    with _blas_controller().limit(limits=torch.get_num_threads(), user_api="blas"):
        yield


def _syrk_lower(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` of a C-contiguous CPU ``x [t, n]`` with only its lower triangle filled (C order)."""
    from scipy.linalg import blas

    a = x.numpy()
    f = blas.ssyrk if a.dtype.itemsize == 4 else blas.dsyrk
    with blas_threads():      # a.T is Fortran-ordered [n, t]: A·Aᵀ = XᵀX, no copy
        c = f(1.0, a.T, trans=0, lower=0)     # Fortran upper triangle = the C-order lower one of c.T
    return torch.from_numpy(c).T


def gram_into(H: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """``H += scale·xᵀx`` for ``x [t, n]`` (float32 or float64), counting the operations done."""
    t, n = x.shape
    if x.device.type != "cpu":
        G = x.T @ x
        for r in range(0, n, ROWS):
            H[r:r + ROWS].add_(G[r:r + ROWS].to(H.dtype), alpha=scale)
        add_flops(matmul_flops(n, t, n), x.dtype == torch.float64)
        return
    L = _syrk_lower(x.contiguous())            # L[i, j] valid for j <= i
    for r in range(0, n, ROWS):
        e = min(r + ROWS, n)
        D = L[r:e, r:e]
        H[r:e, :r].add_(L[r:e, :r].to(H.dtype), alpha=scale)       # L is read again: never scaled in place
        H[r:e, r:e].add_((D.tril() + D.tril(-1).T).to(H.dtype), alpha=scale)
        H[r:e, e:].add_(L[e:, r:e].T.to(H.dtype), alpha=scale)
    add_flops(t * n * (n + 1), x.dtype == torch.float64)


class HessianAccumulator:
    """Running mean of ``2·xxᵀ`` over calibration tokens, in ``dtype`` (float64 unless given; float32 on MPS).
    Each batch's ``XᵀX`` is one float32 ``syrk`` (the expensive part); a float64 running sum keeps thousands of
    batches from drifting, a float32 one (GPTQ's float32 solve) halves the n×n memory."""

    def __init__(self, n_in: int, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.dtype = torch.float32 if device.type == "mps" else (dtype or torch.float64)
        self.H = torch.zeros(n_in, n_in, dtype=self.dtype, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.H.device, torch.float32)
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        gram_into(self.H, x, 2.0 / self.n)


@torch.no_grad()
def collect_hessians(layer: nn.Module, inputs, names: list[str], device: torch.device,
                     stop_early: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``H`` of each named submodule's input over all calibration batches of ``inputs`` (LayerInputs).
    With ``stop_early`` (one name) each forward stops once that input is seen, skipping the rest of the layer."""
    from macq.quantizers.calibration import batch_calls, module_inputs

    acc: dict[str, HessianAccumulator] = {}

    def cb(name: str, x: torch.Tensor) -> None:
        acc.setdefault(name, HessianAccumulator(x.shape[-1], device, dtype)).add(x)
        if stop_early:
            raise _StopForward

    with module_inputs(layer, names, cb):
        for hs, kw in batch_calls(layer, inputs, device):
            try:
                layer(hs, **kw)
            except _StopForward:
                pass
    return {k: a.H for k, a in acc.items()}

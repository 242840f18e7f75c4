"""Input Hessians ``H = 2/n·Σxxᵀ`` of a decoder layer's linears, the expensive half of GPTQ-style methods.

* :func:`gram_lower_into` updates the lower triangle of ``H`` by ``XᵀX``. On the CPU it is BLAS ``syrk``,
  which computes one triangle (``n²·t`` operations instead of the ``2·n²·t`` of a general product), in place
  when ``H`` has the inputs' dtype; :func:`mirror_lower` completes ``H`` once at the end.
* :func:`gram_into` adds ``scale·XᵀX`` to the whole of ``H`` (a float64 sum of float32 products).
* :class:`HessianAccumulator` keeps the running mean over calibration batches.
* :func:`collect_hessians` runs a decoder layer over its calibration inputs with hooks on the named linears.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn as nn

from macq.device import has_float64
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


def _syrk(x: torch.Tensor, alpha: float, beta: float = 0.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``beta·out + alpha·XᵀX`` in the lower triangle (C order) of ``out`` for a C-contiguous CPU ``x [t, n]``;
    a new matrix whose other triangle is zero when ``out`` is None. ``out`` must have ``x``'s dtype; it is
    updated in place (no n×n temporary)."""
    from scipy.linalg import blas

    a = x.numpy()
    f = blas.ssyrk if a.dtype.itemsize == 4 else blas.dsyrk
    c = None if out is None else out.numpy().T           # C-order [n, n] seen as Fortran: its upper triangle
    with blas_threads():      # a.T is Fortran-ordered [n, t]: A·Aᵀ = XᵀX, no copy
        r = f(alpha, a.T, beta=beta, c=c, trans=0, lower=0, overwrite_c=1)
    if out is None:
        return torch.from_numpy(r).T
    if r is not c:                                       # SciPy had to copy (not expected for a contiguous out)
        out.copy_(torch.from_numpy(r).T)
    return out


def mirror_lower(H: torch.Tensor) -> None:
    """Copy ``H``'s lower triangle onto its upper one, a block of rows at a time (no n×n temporary)."""
    n = H.shape[0]
    for r in range(0, n, ROWS):
        e = min(r + ROWS, n)
        D = H[r:e, r:e]
        D.copy_(D.tril() + D.tril(-1).T)
        H[r:e, e:].copy_(H[e:, r:e].T)


def gram_lower_into(H: torch.Tensor, x: torch.Tensor, alpha: float, beta: float = 1.0) -> None:
    """``H ← beta·H + alpha·xᵀx`` on ``H``'s lower triangle (its upper one is left stale: :func:`mirror_lower`
    completes it once, after the last batch). When ``H`` has ``x``'s dtype this is one in-place ``syrk``: the
    product, the decay and the sum in one BLAS call. Counts the operations done."""
    t, n = x.shape
    if x.device.type != "cpu":
        G = x.T @ x
        H.mul_(beta).add_(G, alpha=alpha)
        add_flops(matmul_flops(n, t, n), x.dtype == torch.float64)
        return
    x = x.contiguous()
    if H.dtype == x.dtype and H.is_contiguous():
        _syrk(x, alpha, beta, out=H)
    else:                                               # float32 products into a float64 sum
        L = _syrk(x, 1.0)
        if beta != 1.0:
            H.mul_(beta)
        for r in range(0, n, ROWS):
            e = min(r + ROWS, n)
            H[r:e, :r].add_(L[r:e, :r], alpha=alpha)
            H[r:e, r:e].add_(L[r:e, r:e].tril(), alpha=alpha)
    add_flops(t * n * (n + 1), x.dtype == torch.float64)


def gram_into(H: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """``H += scale·xᵀx`` on the whole of a symmetric ``H`` for ``x [t, n]`` (float32 or float64): the lower
    triangle updated, then mirrored."""
    gram_lower_into(H, x, scale)
    mirror_lower(H)


class HessianAccumulator:
    """Running mean of ``2·xxᵀ`` over calibration tokens, in ``dtype`` (float64 unless given; float32 on MPS).
    Each batch's ``XᵀX`` is one float32 ``syrk`` (the expensive part); a float64 running sum keeps thousands of
    batches from drifting, a float32 one (GPTQ's float32 solve) halves the n×n memory and is updated by the
    ``syrk`` itself. Only the lower triangle is summed; :attr:`H` mirrors it when read."""

    def __init__(self, n_in: int, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.dtype = (dtype or torch.float64) if has_float64(device) else torch.float32
        self._H = torch.zeros(n_in, n_in, dtype=self.dtype, device=device)
        self._symmetric = True
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self._H.device, torch.float32)
        t = x.shape[0]
        beta = self.n / (self.n + t)
        self.n += t
        gram_lower_into(self._H, x, 2.0 / self.n, beta)
        self._symmetric = False

    @property
    def H(self) -> torch.Tensor:
        """The symmetric running mean."""
        if not self._symmetric:
            mirror_lower(self._H)
            self._symmetric = True
        return self._H


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

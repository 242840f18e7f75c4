"""AWQ's searches, vectorised: per-channel scale exponent α, per-group clipping, greedy rounding.

All errors are *exact output errors* computed from the input Gram matrix ``H = XᵀX`` over every
calibration token, not from a token subsample: for a weight error ``D [out, in]`` the summed squared
output error ``‖X Dᵀ‖²`` equals ``Σ (D H) ⊙ D``. A scale ``s`` turns inputs into ``X / s`` and weights
into ``W · diag(s)``, so a candidate's error is ``‖(X/s)(W s − Q(W s))ᵀ‖²`` = the same formula with
``D = (W s − Q(W s)) / s`` against the unscaled ``H``. The metric is the mapping's linears' outputs
(exact for each linear), not the ``inspect`` module's output: cheaper, and independent of attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from macq.device import has_float64
from macq.microscale import FPFormat
from macq.perf import matmul_flops
from macq.progress import add_flops
from macq.quantizers import mxfp
from macq.quantizers.grid import (
    affine_params,
    codes_into,
    dequantize_codes,
    dequantize_into,
    fake_quantize,
    params_from_range,
    quantize_codes,
)

FakeQuant = Callable[[torch.Tensor], torch.Tensor]   # [out, in] -> the rounded weight, same shape
CHUNK_ELEMENTS = 1 << 24   # weight elements per chunk of the α search (its temporaries are a few of these)
CLIP_ELEMENTS = 1 << 19    # weights per block of the clip search: its two float32 buffers (2 MiB each) stay in cache


def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, in // g, g]`` (groups along the input dim)."""
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def fq(w: torch.Tensor, bits: int, g: int, symmetric: bool, scale_dtype: torch.dtype,
       clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Nearest-rounded weight on the shared grid (``[out, in]``), optional per-group clip ``[out, G]``."""
    return fake_quantize(grouped(w, g), bits, symmetric, "int", scale_dtype, clip).reshape(w.shape)


def output_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``‖X dᵀ‖²`` from ``H = XᵀX``; per output row ``[out]``."""
    return ((d @ h) * d).sum(-1)


def candidate_scales(x_sal: torch.Tensor, alpha: float, w_sal: torch.Tensor | None = None) -> torch.Tensor:
    """``s = salience^α`` (``/ w_salience^(1−α)`` with duo scaling), normalised so ``max·min = 1``
    (the AWQ paper's normalisation: keeps the weight range centred, only the ratio between channels matters)."""
    s = x_sal.clamp_min(1e-8).pow(alpha)
    if w_sal is not None:
        s = s / w_sal.clamp_min(1e-8).pow(1 - alpha)
    s = s.clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_salience(w: torch.Tensor, g: int) -> torch.Tensor:
    """Mean over output rows of ``|w|`` normalised by its group's absmax (AutoAWQ's duo-scaling term)."""
    wg = grouped(w.abs(), g)
    return (wg / wg.amax(-1, keepdim=True).clamp_min(1e-12)).reshape(w.shape).mean(0)


def search_scale(w: torch.Tensor, h: torch.Tensor, x_sal: torch.Tensor, bits: int, g: int, symmetric: bool,
                 scale_dtype: torch.dtype, n_grid: int, duo: bool = False, quant: FakeQuant | None = None,
                 x: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float, float]:
    """Best ``s`` over ``α ∈ {0, 1/n, …, (n−1)/n}`` for the stacked weights ``w [Σout, in]`` sharing input.

    Returns ``(s, α, error, error at α=0)``. α = 0 gives ``s = 1`` (plain nearest rounding), so the chosen
    scale is never worse than round-to-nearest on this metric. ``quant`` replaces the integer grid's nearest
    rounding (a float mode passes :func:`fp_fake_quant`). With the inputs ``x [tokens, in]`` (fewer tokens
    than inputs) each candidate's error is ``‖x dᵀ‖²`` directly, the same number as from ``h`` at
    ``tokens/in`` of the operations.
    """
    if quant is None:
        def quant(x: torch.Tensor) -> torch.Tensor:
            return fq(x, bits, g, symmetric, scale_dtype)

    h32 = h.float() if x is None else None
    w_sal = weight_salience(w, g) if duo else None
    best = (torch.ones(w.shape[1], device=w.device), 0.0, float("inf"))
    err0 = float("nan")
    rows = max(1, CHUNK_ELEMENTS // w.shape[1])   # rows per chunk: the temporaries stay ~64 MB, not 4× the weight
    for k in range(n_grid):
        alpha = k / n_grid
        s = candidate_scales(x_sal, alpha, w_sal) if (alpha > 0 or duo) else torch.ones(w.shape[1], device=w.device)
        err = 0.0
        for r in range(0, w.shape[0], rows):
            ws = w[r:r + rows] * s
            d = (ws - quant(ws)) / s
            if x is None:
                err += float(output_error(d, h32).sum())
                add_flops(matmul_flops(*d.shape, h32.shape[1]))
            else:
                err += float((x @ d.T).pow_(2).sum())
                add_flops(matmul_flops(x.shape[0], x.shape[1], d.shape[0]))
        if k == 0:
            err0 = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], err0


def search_clip(w: torch.Tensor, h: torch.Tensor, bits: int, g: int, symmetric: bool, scale_dtype: torch.dtype,
                n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group range shrink ``[out, G]`` minimising each group's output error ``d_g H_gg d_gᵀ``.

    Uses the diagonal ``g×g`` blocks of ``H`` (the group's own contribution, as AutoAWQ's per-group search
    does) for every output row and group at once; 1.0 is tried first and only strict improvements move it.
    The weights are held group-major (``[G, out, g]``) and searched ``CLIP_ELEMENTS`` weights (a block of rows)
    at a time, every candidate on that block before the next: each candidate is the shared grid's arithmetic
    in place on buffers that stay in cache, and one batched ``[rows, g] @ [g, g]`` product per group.
    """
    out, inp = w.shape
    n_g = inp // g
    hb = block_diagonal(h, g)                          # [G, g, g]
    wg = grouped(w.float(), g).transpose(0, 1).contiguous()   # [G, out, g]
    lo, hi = wg.amin(-1), wg.amax(-1)                  # [G, out]: the range once, scaled per candidate
    factors = [1.0 - max_shrink * i / n_grid for i in range(n_grid)]
    grids = [params_from_range(lo * c, hi * c, bits, symmetric, "int", scale_dtype)[:2]
             for c in (torch.tensor(f, dtype=torch.float32, device=w.device) for f in factors)]
    best_err = torch.full((n_g, out), float("inf"), device=w.device)
    best = torch.ones(n_g, out, device=w.device)
    rows = max(1, CLIP_ELEMENTS // inp)
    x, y = torch.empty(2, n_g * rows * g, device=w.device)   # reused for every block and candidate
    for r in range(0, out, rows):
        e = min(r + rows, out)
        wr, shape = wg[:, r:e], (n_g, e - r, g)
        xr, yr = x[:wr.numel()].view(shape), y[:wr.numel()].view(shape)
        be, bc = best_err[:, r:e], best[:, r:e]
        for c, (s, z) in zip(factors, grids):
            su, zu = s[:, r:e, None], None if z is None else z[:, r:e, None]
            dequantize_into(codes_into(wr, su, zu, bits, xr), su, zu, bits, xr).sub_(wr)   # q − w = −d
            err = torch.bmm(xr, hb, out=yr).mul_(xr).sum(-1)     # d_g H_gg d_gᵀ per group and row
            better = err < be
            be.copy_(torch.where(better, err, be))
            bc.masked_fill_(better, c)
    add_flops(matmul_flops(out, g, g) * n_g * n_grid)   # d_g H_gg per row, group and candidate (the dot: element-wise)
    return best.T.contiguous()


# ------------------------------------------------------------------ MLX's float grids (mxfp4, nvfp4, mxfp8)
# The block scale is one byte (E8M0 or E4M3), so AWQ's continuous range shrink becomes a choice among the few
# scale bytes :func:`macq.quantizers.mxfp.search_scales` tries (MLX's own first); the search and the codes are
# mxfp.py's, only the error that ranks the candidates is AWQ's.

def block_diagonal(h: torch.Tensor, g: int) -> torch.Tensor:
    """The diagonal ``g×g`` blocks of ``H [in, in]`` -> ``[in // g, g, g]`` (each group's own contribution)."""
    n_g = h.shape[0] // g
    return h.reshape(n_g, g, n_g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).float()   # blocks, then float32


def fp_fake_quant(fmt: FPFormat, dtype: torch.dtype) -> FakeQuant:
    """The α search's quantizer on a float grid: each block's scale byte by the data-free
    :func:`~macq.quantizers.mxfp.search_scales` (the candidates the final rounding chooses among), codes nearest."""
    def quant(w: torch.Tensor) -> torch.Tensor:
        if not has_float64(w.device):     # MLX's float64 rounding: on the CPU
            return quant(w.cpu()).to(w.device)
        wg = grouped(w, fmt.group_size).double()
        _, div = mxfp.search_scales(wg, fmt, dtype)
        return mxfp.round_on(wg, div, fmt)[1].reshape(w.shape).to(w.dtype)
    return quant


def search_fp_scales(w: torch.Tensor, h: torch.Tensor, fmt: FPFormat, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's clip search on a float grid: per block of ``w [out, in]`` the scale byte (of
    :func:`~macq.quantizers.mxfp.search_scales`'s candidates) with the least output error ``d_g H_gg d_gᵀ``
    (the diagonal-block metric of :func:`search_clip`); MLX's byte kept on ties. ``(bytes, divisors)``
    ``[out, G, 1]`` (divisors float64: its caller brings ``w`` to the CPU on a device without float64)."""
    hb = block_diagonal(h, fmt.group_size)

    def error(wg: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        d = wg - q
        return torch.einsum("ogk,gkl,ogl->og", d, hb, d).unsqueeze(-1)

    return mxfp.search_scales(grouped(w, fmt.group_size).double(), fmt, dtype, error)


def clamp_to_clip(w: torch.Tensor, clip: torch.Tensor, g: int, symmetric: bool) -> torch.Tensor:
    """Clamp each group to its shrunken range, so any quantizer (GPTQ) derives the clipped grid from it."""
    wg = grouped(w, g)
    lo, hi = wg.amin(-1) * clip, wg.amax(-1) * clip
    if symmetric:
        hi = torch.maximum(lo.abs(), hi.abs())
        lo = -hi
    return torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1)).reshape(w.shape)


def nearest_codes(w: torch.Tensor, bits: int, g: int, symmetric: bool, scale_dtype: torch.dtype,
                  clip: torch.Tensor | float = 1.0):
    """``(codes [out, G, g], scale, zero, bias)`` on the shared grid."""
    wg = grouped(w, g)
    scale, zero, bias = affine_params(wg, bits, symmetric, "int", scale_dtype, clip)
    return quantize_codes(wg, scale, zero, bias, bits), scale, zero, bias


def mean_error(w: torch.Tensor, w_hat: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """The greedy-rounding proxy per output row: ``E[X]·(w − ŵ)`` (bias the rounding adds to the output)."""
    return (w - w_hat) @ x_mean


def greedy_round(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bits: int, x_mean: torch.Tensor, protect: torch.Tensor) -> torch.Tensor:
    """Flip roundings to the other neighbouring grid point where that cancels the row's mean output error.

    Per row, candidate flips are those moving ``e = E[X]·(w − ŵ)`` towards 0, ranked by error cancelled per
    unit of extra squared weight error (weights near a rounding midpoint first); the prefix of that ranking
    whose cumulative change brings ``|e|`` lowest is applied. The empty prefix is allowed, so ``|e|`` never
    grows. ``protect [in]`` (salient input channels) keeps nearest rounding. Codes ``[out, G, g]``.
    """
    out, n_g, g = codes.shape
    maxq = 2 ** bits - 1
    z = zero.unsqueeze(-1) if zero is not None else torch.tensor(float(2 ** (bits - 1)), device=w.device)
    s = scale.unsqueeze(-1)
    wg = grouped(w.float(), g)
    pos = wg / s + z                                   # exact (unrounded) code position
    c = codes.float()
    step = torch.where(pos >= c, 1.0, -1.0)
    other = c + step
    d = (wg - s * (c - z)).reshape(out, -1)
    d_new = (wg - s * (other - z)).reshape(out, -1)
    m = x_mean.float()
    e = d @ m                                          # [out]
    delta = (d_new - d) * m                            # change of e per flip
    cost = d_new.pow(2) - d.pow(2)
    ok = ((other >= 0) & (other <= maxq)).reshape(out, -1) & ~protect.reshape(1, -1)
    ok &= (delta * e.unsqueeze(-1) < 0)                # moves e towards zero
    prio = torch.where(ok, delta.abs() / (cost + 1e-12), torch.full_like(delta, -1.0))
    order = prio.argsort(-1, descending=True)
    dsort = torch.where(ok, delta, torch.zeros_like(delta)).gather(-1, order)
    path = torch.cat([e.unsqueeze(-1), e.unsqueeze(-1) + dsort.cumsum(-1)], -1).abs()
    k = path.argmin(-1)                                # flips to apply per row (0 = none)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=w.device).expand_as(order).contiguous())
    flip = (rank < k.unsqueeze(-1)) & ok
    new = torch.where(flip.reshape(codes.shape), other, c)
    return new.clamp(0, maxq).to(torch.uint8)


def dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
            bits: int) -> torch.Tensor:
    return dequantize_codes(codes, scale, zero, bias, bits).reshape(codes.shape[0], -1)

"""Palettization: every weight becomes an index into a small look-up table (Core ML ``constexpr_lut_to_dense``).

One LUT of ``2**bits`` entries serves either the whole tensor (``per_tensor``) or each group of
``group_size`` consecutive *output* channels (``per_grouped_channel``, Core ML's layout). Two ways to pick it:

* k-means, ``solver="exact"`` (the default, :mod:`macq.quantizers.exact1d`): the globally optimal LUT of every
  group by a 1-D dynamic program. ``solver="lloyd"`` (:func:`kmeans_lut`): k-means++ seedings (plus an exact-DP
  seeding on a coreset), then Lloyd on all groups at once. The data is 1-D, so each row is sorted once;
  assignment is then a ``searchsorted`` of the centroid midpoints into the sorted row and the update is prefix-sum
  differences: O(K log n) per step. Lloyd is several times faster but stops in local optima that cost perplexity
  (see ``exact1d``). Optional per-weight importance makes either weighted k-means (Fisher / Hessian diagonal).
* uniform (:func:`uniform_lut`): ``linspace(min, max, 2**bits)`` per group, coremltools' "uniform" mode.

The LUT is stored in ``lut_dtype`` (fp16 by default, as Core ML stores it), so the final indices are the
nearest entries of the *rounded* LUT: ``record.dequantize()`` is then exactly what the device will compute.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from macq.quantizers.base import QuantConfig, check
from macq.quantizers.exact1d import exact_centroids
from macq.record import LUTRecord, record_to

GRANULARITIES = ("per_tensor", "per_grouped_channel")
LUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SOLVERS = ("exact", "lloyd")
_SEED_POINTS = 8192  # k-means++ seeds from at most this many points per group
_DP_MAX_K = 32       # the coreset-DP seeding (O(K·m²) per group) runs up to 5 bits
_DP_CHUNK = 32       # groups per DP batch: [32, 257, 257] float64 tables (17 MB) stay cache-friendly;
                     # 128 was 4x slower per group
MAX_OUTLIER_FRAC = 0.1
OUTLIER_HELP = ("fraction of each tensor's weights kept exactly in fp16 and left out of the LUT fit (SqueezeLLM's "
                "dense-and-sparse; Core ML: + constexpr_sparse_to_dense, 1 bit/weight mask + 16 bits per outlier)")


@dataclass
class UniformConfig(QuantConfig):
    method = "uniform"
    bits: int = 4
    granularity: str = "per_grouped_channel"
    group_size: int = 16           # output channels sharing one LUT (per_grouped_channel)
    lut_dtype: str = "float16"

    def __post_init__(self) -> None:
        check(1 <= self.bits <= 8, f"--bits {self.bits}: {self.method} supports 1..8")
        check(self.granularity in GRANULARITIES,
              f"--granularity {self.granularity}: expected one of {', '.join(GRANULARITIES)}")
        check(self.group_size > 0, f"--group-size {self.group_size}: expected > 0 output channels per LUT")
        check(self.lut_dtype in LUT_DTYPES, f"--lut-dtype {self.lut_dtype}: expected one of {', '.join(LUT_DTYPES)}")


@dataclass
class KMeansConfig(UniformConfig):
    method = "kmeans"
    solver: str = field(default="exact", metadata={"help": "k-means solver: exact (optimal LUT per group, 1-D DP) | "
                                                           "lloyd (seeded Lloyd: faster, local optima)"})
    n_iter: int = 300              # lloyd: steps at most (stops once no assignment changes); O(K log n) each
    seed: int = 0
    n_init: int = 4                # lloyd: k-means++ restarts; each group keeps its best
    weighted: bool = False         # needs per-weight importance passed to quantize_weight
    outlier_frac: float = field(default=0.0, metadata={"help": OUTLIER_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.solver in SOLVERS, f"--solver {self.solver}: expected one of {', '.join(SOLVERS)}")
        check(self.n_iter >= 0, f"--n-iter {self.n_iter}: expected >= 0")
        check(self.n_init >= 1, f"--n-init {self.n_init}: expected >= 1")
        check_outlier_frac(self.outlier_frac)


def check_outlier_frac(frac: float) -> None:
    check(0.0 <= frac < MAX_OUTLIER_FRAC, f"--outlier-frac {frac}: expected a fraction in [0, {MAX_OUTLIER_FRAC})")


# ------------------------------------------------------------------------------------------ LUT fitting
def nearest_indices(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest LUT entry for every ``x [G, n]`` given ``lut [G, K]`` (any order), as int64."""
    lut32 = lut.float()
    srt, order = lut32.sort(-1)
    mids = (srt[:, 1:] + srt[:, :-1]) / 2
    pos = torch.searchsorted(mids.contiguous(), x.contiguous())
    return torch.gather(order, 1, pos)


def _sample(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row of ``p [G, n]`` drawn ∝ p (inverse CDF: a cumsum and a searchsorted, no multinomial)."""
    cdf = p.double().cumsum(1)
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, side="right").clamp_max(p.shape[1] - 1).squeeze(1)


def _kmeans_pp(x: torch.Tensor, wts: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding for every group at once: each new centre is drawn with probability ∝ weight·D²."""
    rows = torch.arange(x.shape[0])
    cents = [x[rows, _sample(wts, gen)]]
    d2 = (x - cents[0].unsqueeze(1)).pow(2)
    for _ in range(1, k):
        p = wts * d2
        p = torch.where(p.sum(1, keepdim=True) > 0, p, wts)  # all points already on a centre: any point
        c = x[rows, _sample(p, gen)]
        cents.append(c)
        d2 = torch.minimum(d2, (x - c.unsqueeze(1)).pow(2))
    return torch.stack(cents, 1)


def _coreset_dp_init(xs: torch.Tensor, csums: tuple[torch.Tensor, ...], k: int, m: int = 256) -> torch.Tensor:
    """Globally optimal k-means of a coarse 1-D coreset, as a seeding that Lloyd cannot get trapped by.

    1-D k-means has a global optimum computable by dynamic programming over sorted points (what coremltools'
    ``kmeans1d`` does, per group, in C). Here the sorted row is cut into ~``m`` atoms at equal-count *and*
    equal-width boundaries (dense centre and sparse tails both resolved; duplicate boundaries are just
    empty atoms), the exact DP runs on the atoms for all groups at once (O(K·m²) per group), and Lloyd then
    refines on every point. Measured on Student-t weights: k-means++ seedings alone end up to ~4% above the
    optimum at 4 bits; with this candidate within ~0.5%. Per-channel LUTs (one 576- or 1536-weight row per
    group) on the default model: mean SSE 0.05% / 0.07% above the exact optimum (coremltools' ``kmeans1d``),
    so the seeding is kept; its cost (O(K·m²) per group, 49152 groups for the embedding alone) is what makes
    per-channel k-means slow, hence the cache-friendly layout below.
    """
    g, n = xs.shape
    half = m // 2
    by_count = torch.linspace(0, n, half + 1).round().long().expand(g, -1)
    lo, hi = xs[:, :1], xs[:, -1:]
    edges = lo + (hi - lo) * torch.linspace(0, 1, half + 1)
    by_width = torch.searchsorted(xs, edges.contiguous())
    pos = torch.cat([by_count, by_width[:, 1:-1]], 1).sort(1).values          # [G, M+1], 0 .. n
    s1, s0, s2 = (torch.gather(c, 1, pos) for c in csums)
    # [G, j, i]: atoms i..j-1, laid out so that the DP's min over the start atom i is over the contiguous last
    # dimension (measured 3-4x faster than reducing the middle one, same values and first-index ties)
    d1, d0, d2 = (a.unsqueeze(2) - a.unsqueeze(1) for a in (s1, s0, s2))
    sse = torch.where(d0 > 0, d2 - d1 * d1 / d0.clamp_min(1e-300), torch.zeros_like(d2)).clamp_min(0)
    mm = pos.shape[1]
    sse = sse.masked_fill(~torch.ones(mm, mm, dtype=torch.bool).tril(-1), float("inf"))
    cost, back = sse[:, :, 0], []
    for _ in range(1, k):
        cost, arg = (cost.unsqueeze(1) + sse).min(2)
        back.append(arg)
    cuts, j = [], torch.full((g,), mm - 1, dtype=torch.long)
    for arg in reversed(back):                                              # backtrack the k-1 cut atoms
        j = arg.gather(1, j.unsqueeze(1)).squeeze(1)
        cuts.append(j)
    bnd = torch.stack([torch.zeros_like(j)] + cuts[::-1] + [torch.full_like(j, mm - 1)], 1)
    num = s1.gather(1, bnd[:, 1:]) - s1.gather(1, bnd[:, :-1])
    den = s0.gather(1, bnd[:, 1:]) - s0.gather(1, bnd[:, :-1])
    fallback = xs.gather(1, pos.gather(1, bnd[:, :-1]).clamp_max(n - 1)).double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), fallback).float()


def _reseed_empty(cents: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """Move empty clusters onto the worst-reconstructed points of their group (largest error first)."""
    empty = counts <= 0
    if not bool(empty.any()):
        return cents
    k = cents.shape[1]
    worst = err.topk(min(k, err.shape[1]), dim=1).indices                  # [G, k']
    rank = (empty.long().cumsum(1) - 1).clamp(0, worst.shape[1] - 1)       # i-th empty slot -> i-th worst point
    cand = torch.gather(x, 1, torch.gather(worst, 1, rank))
    return torch.where(empty, cand, cents)


@contextmanager
def _one_thread() -> Iterator[None]:
    """k-means here is many small ops; torch's intra-op thread pool makes some of them 1000x slower on a busy
    machine (measured: a [16, 15]-into-[16, 24576] ``searchsorted`` took 24 ms with 2 threads, 4 us with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _lloyd(xs: torch.Tensor, ws: torch.Tensor, csums: tuple[torch.Tensor, ...], cents: torch.Tensor,
           n_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd on sorted rows ``xs [G, n]`` from ``cents [G, K]``; returns (sorted centroids, SSE per group)."""
    g, n = xs.shape
    c_wx, c_w, c_wxx = csums
    ends = torch.full((g, 1), n, dtype=torch.long)
    cents, prev = cents.sort(-1).values, None

    def stats(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bounds = torch.cat([torch.zeros_like(ends), b, ends], 1)
        return tuple(torch.gather(c, 1, bounds[:, 1:]) - torch.gather(c, 1, bounds[:, :-1]) for c in csums)

    for _ in range(n_iter):
        mids = ((cents[:, 1:] + cents[:, :-1]) / 2).contiguous()
        b = torch.searchsorted(xs, mids, side="right")         # cluster j holds xs[b[j-1]:b[j]]
        if prev is not None and torch.equal(b, prev):
            break
        prev = b
        sums, counts, _ = stats(b)
        cents = torch.where(counts > 0, sums / counts.clamp_min(1e-300), cents.double()).float()
        if bool((counts <= 0).any()):
            err = ws * (xs - torch.gather(cents, 1, torch.searchsorted(mids, xs))).pow(2)
            cents = _reseed_empty(cents, counts, xs, err)
        cents = cents.sort(-1).values
    mids = ((cents[:, 1:] + cents[:, :-1]) / 2).contiguous()
    sx, sw, sxx = stats(torch.searchsorted(xs, mids, side="right"))
    c = cents.double()
    return cents, (sxx - 2 * c * sx + c * c * sw).sum(1)


def kmeans_lut(x: torch.Tensor, bits: int, weights: torch.Tensor | None = None, n_iter: int = 300, seed: int = 0,
               lut_dtype: torch.dtype = torch.float16, n_init: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 1-D k-means per row of ``x [G, n]``: returns ``(lut [G, 2**bits] in lut_dtype, idx [G, n] uint8)``.

    ``weights [G, n]`` (non-negative importance) default to ones. Each row is sorted once; a Lloyd step is then
    ``searchsorted`` of the K-1 centroid midpoints into the sorted row plus prefix-sum differences, i.e.
    O(K log n) per group instead of O(n), so running Lloyd to convergence (at most ``n_iter`` steps, stopping
    when no cluster boundary moves in any group) is cheap; heavy-tailed weights need hundreds of steps.
    Lloyd only finds a local optimum (measured spread between k-means++ seeds: up to ~4% MSE at 4 bits), so
    ``n_init`` k-means++ seedings (seeded generator) plus, up to 5 bits, one coreset-DP seeding
    (:func:`_coreset_dp_init`) run one after another and each group keeps its lowest-SSE result.
    Indices are nearest to the dtype-rounded LUT.
    """
    x = x.float()
    wts = torch.ones_like(x) if weights is None else weights.float().clamp_min(0)
    check(wts.shape == x.shape, f"importance weights have shape {tuple(wts.shape)}, expected {tuple(x.shape)}")
    wts = torch.where(wts.sum(1, keepdim=True) > 0, wts, torch.ones_like(wts))
    xs, perm = x.sort(1)
    ws = torch.gather(wts, 1, perm)
    zero = torch.zeros(x.shape[0], 1, dtype=torch.float64)
    xd, wd = xs.double(), ws.double()                     # float64 prefix sums: n can be ~1e7
    csums = tuple(torch.cat([zero, t.cumsum(1)], 1) for t in (wd * xd, wd, wd * xd * xd))
    gen = torch.Generator().manual_seed(seed)
    # Seeding costs O(K·n) per restart; an evenly strided subsample of the *sorted* row keeps its distribution
    # (a quantile sketch), and Lloyd then runs on every point.
    n = xs.shape[1]
    sub = torch.linspace(0, n - 1, min(n, _SEED_POINTS)).round().long()
    best, best_sse = None, None
    n_dp = 1 if 2 ** bits <= _DP_MAX_K else 0
    for r in range(max(1, n_init) + n_dp):
        with _one_thread():
            if r < n_dp:  # chunks of groups bound the [groups, m, m] DP tables
                init = torch.cat([_coreset_dp_init(xs[i:i + _DP_CHUNK], tuple(c[i:i + _DP_CHUNK] for c in csums),
                                                   2 ** bits) for i in range(0, xs.shape[0], _DP_CHUNK)])
            else:
                init = _kmeans_pp(xs[:, sub], ws[:, sub], 2 ** bits, gen)
            cents, sse = _lloyd(xs, ws, csums, init, n_iter)
        if best is None:
            best, best_sse = cents, sse
        else:
            better = sse < best_sse
            best = torch.where(better.unsqueeze(1), cents, best)
            best_sse = torch.where(better, sse, best_sse)
    lut = best.to(lut_dtype)
    return lut, nearest_indices(x, lut).to(torch.uint8)


def uniform_lut(x: torch.Tensor, bits: int, lut_dtype: torch.dtype = torch.float16
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``linspace(min, max, 2**bits)`` per row of ``x [G, n]`` (coremltools "uniform"), nearest indices."""
    x = x.float()
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    steps = torch.arange(2 ** bits, dtype=torch.float32)
    lut = (steps * ((hi - lo) / (2 ** bits - 1)) + lo).to(lut_dtype)
    return lut, nearest_indices(x, lut).to(torch.uint8)


# ------------------------------------------------------------------------------------------ records
def _groups(w: torch.Tensor, cfg: UniformConfig) -> torch.Tensor:
    out, inp = w.shape
    if cfg.granularity == "per_tensor":
        return w.reshape(1, out * inp)
    check(out % cfg.group_size == 0, f"--group-size {cfg.group_size} does not divide the output dim {out}")
    return w.reshape(out // cfg.group_size, cfg.group_size * inp)


def quantize_weight(w: torch.Tensor, cfg: UniformConfig, importance: torch.Tensor | None = None) -> LUTRecord:
    """``w [out, in]`` -> LUTRecord(indices [out, in], lut [n_groups, 2**bits]).

    ``importance [out, in]`` (k-means only, with ``weighted=True``) weights each element's squared error.
    With ``outlier_frac`` the selected outliers (:mod:`macq.quantizers.outliers`) get weight 0 in the fit and are
    kept in the record's sparse part at their fp16 values. The clustering is CPU code (the exact 1-D optimum runs in
    NumPy / coremltools): a weight on an accelerator is clustered on the CPU and its record moved back there.
    """
    if w.device.type != "cpu":
        imp = None if importance is None else importance.cpu()
        return record_to(quantize_weight(w.cpu(), cfg, imp), w.device)
    out, inp = w.shape
    x = _groups(w.float(), cfg)
    dt = LUT_DTYPES[cfg.lut_dtype]
    if isinstance(cfg, KMeansConfig):
        if cfg.weighted:
            check(importance is not None, "--weighted: k-means needs per-weight importance (none was given)")
            check(tuple(importance.shape) == (out, inp),
                  f"importance has shape {tuple(importance.shape)}, expected {(out, inp)}")
        imp = importance.float() if cfg.weighted else None
        mask = None
        if cfg.outlier_frac > 0:
            from macq.quantizers.outliers import fit_weights, select_outliers

            mask = select_outliers(w, x, cfg.outlier_frac)
            imp = fit_weights(mask, imp)
        wts = _groups(imp, cfg) if imp is not None else None
        if cfg.solver == "exact":
            lut = exact_centroids(x, 2 ** cfg.bits, wts).to(dt)
            idx = nearest_indices(x, lut).to(torch.uint8)
        else:
            lut, idx = kmeans_lut(x, cfg.bits, wts, cfg.n_iter, cfg.seed, dt, cfg.n_init)
        if mask is not None:
            from macq.quantizers.outliers import outliers_from_mask

            rec = LUTRecord(indices=idx.reshape(out, inp), lut=lut, bits=cfg.bits)
            return outliers_from_mask(rec, w.float(), mask)
    else:
        lut, idx = uniform_lut(x, cfg.bits, dt)
    return LUTRecord(indices=idx.reshape(out, inp), lut=lut, bits=cfg.bits)


def lut_mse(w: torch.Tensor, rec: LUTRecord) -> float:
    """Mean squared weight error of a palettized record (the figure of merit k-means minimises)."""
    return float((rec.dequantize() - w.float()).pow(2).mean())


__all__ = ["KMeansConfig", "UniformConfig", "kmeans_lut", "uniform_lut", "nearest_indices", "quantize_weight",
           "lut_mse"]

"""Globally optimal 1-D (weighted) k-means per LUT group: the default solver of macq's k-means palettizers.

Why not Lloyd: on the default model's 210 decoder linears (4-bit, groups of 16 rows) macq's Lloyd, seeded by an
exact DP on a coreset, converges (more steps change nothing) to LUTs whose weight SSE is only 0.05% above the
optimum, yet the palettized model's perplexity is 11-15% worse than with this solver's LUTs (wiki 55.2 vs 48.9,
c4 153.9 vs 133.6, tinystories 26.3 vs 23.5, float embedding; scripts/benchmarks/kmeans_solver_probe.py, docs/results/lut-g16.md).
Which near-optimal LUT suits the outputs varies by layer (not established why), but over a whole model the SSE
optimum won on every text measured.

The solver is the ``kmeans1d`` dynamic program (Grønlund et al., SMAWK / divide-and-conquer over the sorted data)
that coremltools bundles as ``coremltools._deps._kmeans1d`` with per-point weights added by Apple; coremltools is a
locked dependency of macq's Core ML exporter, and its ``PostTrainingPalettizer`` / ``SKMPalettizer`` call the same
routine (after rounding weights to 1e-4, which macq does not do). The C call runs without the GIL, so groups are
spread over ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from macq.errors import MacqError


def _solver():
    try:
        from coremltools._deps import _kmeans1d
    except ImportError as e:  # pragma: no cover - coremltools is in the lock
        raise MacqError(f"solver=exact needs coremltools' bundled kmeans1d ({e}); pass --solver lloyd") from e
    return _kmeans1d


def _one(args: tuple[np.ndarray, np.ndarray | None, int]) -> np.ndarray:
    """Sorted optimal centroids of one group. With fewer distinct values than ``k`` the solver leaves clusters
    empty (centroid 0.0, which nearest assignment could then pick): those repeat a used centroid instead."""
    row, wts, k = args
    # The DP runs on the distinct values weighted by their multiplicity (summed importance): the same objective,
    # so the same optimum, on 2-10x fewer points (fp16/bf16 and dequantized checkpoints repeat values a lot).
    vals, inv = np.unique(row, return_inverse=True)
    res = _solver().cluster(vals, k, weights=np.bincount(inv, weights=wts, minlength=vals.size))
    cents = np.asarray(res.centroids, dtype=np.float64)
    used = np.bincount(np.asarray(res.clusters), minlength=cents.size) > 0
    cents = cents[used]
    return np.sort(np.pad(cents, (0, k - cents.size), mode="edge"))


def exact_centroids(x: torch.Tensor, k: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[G, k]`` float64 centroids minimising ``sum w (x - c(x))^2`` exactly, per row of ``x [G, n]``.

    Non-negative ``weights [G, n]``; a row whose weights are all zero is solved unweighted (as :func:`kmeans_lut`
    does), and zero weights inside a row get a tiny floor (1e-12 of the row mean) so every cluster has a mean.
    """
    xd = x.detach().double().cpu().numpy()
    wd = None
    if weights is not None:
        w = weights.detach().double().clamp_min(0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        wd = (w + 1e-12 * w.mean(1, keepdim=True)).cpu().numpy()
    jobs = [(xd[g], None if wd is None else wd[g], k) for g in range(xd.shape[0])]
    workers = max(1, min(torch.get_num_threads(), len(jobs)))
    if workers == 1:
        cents = [_one(j) for j in jobs]
    else:
        with ThreadPoolExecutor(workers) as pool:
            cents = list(pool.map(_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return torch.from_numpy(np.stack(cents))


__all__ = ["exact_centroids"]

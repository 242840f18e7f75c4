"""Per-channel LUTs: many small k-means groups, checked against coremltools' exact 1-D k-means.

``coremltools._deps._kmeans1d`` is an independent exact optimum (a C dynamic program over every point), so the
SSE of macq's LUT for each row can be compared with the true minimum.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from macq.quantizers.palettize import _coreset_dp_init, kmeans_lut

kmeans1d = pytest.importorskip("coremltools._deps")._kmeans1d
if kmeans1d is None:
    pytest.skip("coremltools ships no kmeans1d here", allow_module_level=True)


def _sse(x: torch.Tensor, cents: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted SSE per row of ``x [G, n]`` with every point on its nearest centroid, float64."""
    xs, c = x.double(), cents.double().sort(1).values
    i = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), xs.contiguous())
    e = (xs - c.gather(1, i)).pow(2)
    return (e if w is None else e * w.double()).sum(1)


def _exact(x: torch.Tensor, k: int, w: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.double().numpy()
    ws = [None] * len(rows) if w is None else w.double().numpy()
    return torch.tensor(np.stack([np.asarray(kmeans1d.cluster(r, k, weights=wr).centroids) for r, wr in zip(rows, ws)]))


def _sums(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    xs, perm = x.double().sort(1)
    ws = w.double().gather(1, perm)
    z = torch.zeros(x.shape[0], 1, dtype=torch.float64)
    return xs.float(), tuple(torch.cat([z, t.cumsum(1)], 1) for t in (ws * xs, ws, ws * xs * xs))


def _rows(kind: str, g: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(g, n, generator=gen) * 0.02
    # heavy-tailed: Student-t with 3 degrees of freedom (normal / sqrt(chi2_3 / 3)), a few large outliers per row
    z, chi2 = torch.randn(g, n, generator=gen), torch.randn(g, n, 3, generator=gen).pow(2).sum(2)
    return z / (chi2 / 3).sqrt() * 0.02


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("weighted", [False, True])
def test_coreset_dp_on_single_point_atoms_is_the_exact_optimum(kind: str, weighted: bool) -> None:
    """With m/2 >= n every point is its own atom, so the coreset DP is the exact DP: its SSE equals kmeans1d's."""
    x = _rows(kind, 6, 60, seed=1)
    w = torch.rand(6, 60, generator=torch.Generator().manual_seed(2)) + 0.1 if weighted else torch.ones(6, 60)
    xs, csums = _sums(x, w)
    cents = _coreset_dp_init(xs, csums, 8, m=256)
    ours, ref = _sse(x, cents, w), _sse(x, _exact(x, 8, w if weighted else None), w)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_per_channel_kmeans_within_a_tenth_percent_of_the_exact_optimum(kind: str) -> None:
    """One LUT per 576-weight row (per-channel, 4 bits): mean SSE within 0.15% of kmeans1d's exact optimum,
    every row within 2%, none below it (a LUT cannot beat the optimum; float32 LUT so no fp16 rounding)."""
    x = _rows(kind, 48, 576, seed=5)
    lut, idx = kmeans_lut(x, 4, lut_dtype=torch.float32, n_init=1)
    gap = _sse(x, lut) / _sse(x, _exact(x, 16)) - 1
    assert float(gap.mean()) < 1.5e-3
    assert float(gap.max()) < 2e-2
    assert float(gap.min()) > -1e-6
    err = (x.unsqueeze(2) - lut.unsqueeze(1)).abs()                    # every row's distance to every entry
    assert torch.equal(err.gather(2, idx.long().unsqueeze(2)).squeeze(2), err.amin(2))


def test_per_channel_weighted_kmeans_near_the_weighted_optimum() -> None:
    """Fisher-like importance (kmeans-cal's path): weighted SSE close to kmeans1d's weighted optimum."""
    x = _rows("heavy", 32, 576, seed=6)
    w = torch.rand(32, 576, generator=torch.Generator().manual_seed(7)).pow(4) + 1e-3
    lut, _ = kmeans_lut(x, 4, weights=w, lut_dtype=torch.float32, n_init=1)
    gap = _sse(x, lut, w) / _sse(x, _exact(x, 16, w), w) - 1
    assert float(gap.mean()) < 3e-3
    assert float(gap.min()) > -1e-6

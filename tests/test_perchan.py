"""Per-channel LUTs (issue 13): many small k-means groups, checked against coremltools' exact 1-D k-means.

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


def _dp_old_layout(xs: torch.Tensor, csums: tuple[torch.Tensor, ...], k: int, m: int = 256) -> torch.Tensor:
    """The coreset DP as written before the per-channel work ([G, i, j] tables, min over the middle dim),
    kept verbatim as the reference that the faster layout must reproduce bit for bit."""
    g, n = xs.shape
    half = m // 2
    by_count = torch.linspace(0, n, half + 1).round().long().expand(g, -1)
    lo, hi = xs[:, :1], xs[:, -1:]
    edges = lo + (hi - lo) * torch.linspace(0, 1, half + 1)
    by_width = torch.searchsorted(xs, edges.contiguous())
    pos = torch.cat([by_count, by_width[:, 1:-1]], 1).sort(1).values
    s1, s0, s2 = (torch.gather(c, 1, pos) for c in csums)
    d1, d0, d2 = (a.unsqueeze(1) - a.unsqueeze(2) for a in (s1, s0, s2))
    sse = torch.where(d0 > 0, d2 - d1 * d1 / d0.clamp_min(1e-300), torch.zeros_like(d2)).clamp_min(0)
    mm = pos.shape[1]
    sse = sse.masked_fill(~torch.ones(mm, mm, dtype=torch.bool).triu(1), float("inf"))
    cost, back = sse[:, 0, :], []
    for _ in range(1, k):
        cost, arg = (cost.unsqueeze(2) + sse).min(1)
        back.append(arg)
    cuts, j = [], torch.full((g,), mm - 1, dtype=torch.long)
    for arg in reversed(back):
        j = arg.gather(1, j.unsqueeze(1)).squeeze(1)
        cuts.append(j)
    bnd = torch.stack([torch.zeros_like(j)] + cuts[::-1] + [torch.full_like(j, mm - 1)], 1)
    num = s1.gather(1, bnd[:, 1:]) - s1.gather(1, bnd[:, :-1])
    den = s0.gather(1, bnd[:, 1:]) - s0.gather(1, bnd[:, :-1])
    fallback = xs.gather(1, pos.gather(1, bnd[:, :-1]).clamp_max(n - 1)).double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), fallback).float()


@pytest.mark.parametrize("n", [16 * 96, 600])
def test_coreset_dp_layout_change_is_bit_identical(n: int) -> None:
    """Groups of 16 rows must give the same LUTs as before: the [G, j, i] DP equals the old [G, i, j] one."""
    x = _rows("heavy", 40, n, seed=3)
    w = torch.rand(40, n, generator=torch.Generator().manual_seed(4))
    xs, csums = _sums(x, w)
    assert torch.equal(_coreset_dp_init(xs, csums, 16), _dp_old_layout(xs, csums, 16))


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


def test_per_channel_kmeans_cal_record_reads_back_bit_exact_from_core_ml() -> None:
    """A per-channel (group_size=1) kmeans-cal record holds one LUT per output row and is written unchanged as
    ``constexpr_lut_to_dense``: Core ML's own value inference gives back exactly the record's fp16 weights."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from converters.weights import apply_records_to_program, plan_layouts
    from macq.data import calibration_samples
    from macq.quantizers import quantize_model
    from macq.tiny import tiny_model, tiny_tokenizer

    calib = calibration_samples(tiny_tokenizer(), "tinystories", 4, 32, seed=0)
    qm = quantize_model(tiny_model(), "kmeans-cal", calib=calib, bits=4, group_size=1, sensitivity="hessian", n_init=1)
    name = next(n for n in qm.records if n.endswith("mlp.down_proj"))
    rec = qm.records[name]
    assert rec.n_lut_groups == rec.shape[0] and tuple(rec.lut.shape) == (rec.shape[0], 16)
    w = rec.dequantize(torch.float32).half().numpy()
    wt = np.ascontiguousarray(w.T)                                   # the program holds [in, out]

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, wt.shape[0]), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.matmul(x=x, y=wt, name="mm")

    layouts, _ = plan_layouts({name: rec})
    apply_records_to_program(prog, {name: rec}, layouts)
    ops = [op for op in prog.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(ops) == 1
    got = np.asarray(ops[0].materialized_val_inference())
    assert np.array_equal(got.view(np.uint16), wt.view(np.uint16))

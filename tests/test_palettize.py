"""Palettization against coremltools' own palettizer on the same tensors, plus structural checks.

coremltools is run the way a Core ML pipeline runs it: on the fp16 weight (its k-means then uses the
optimal 1-D ``kmeans1d`` for groups of >= 10000 weights, scikit-learn below) and on the fp32 weight
(scikit-learn). MSE is always measured against the original fp32 weight.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from macq.errors import MacqError
from macq.quantizers.palettize import KMeansConfig, UniformConfig, kmeans_lut, lut_mse, quantize_weight

pytest.importorskip("sklearn")


def coreml_palettize(w: torch.Tensor, bits: int, mode: str, granularity: str, group_size: int = 16,
                     dtype=np.float16) -> torch.Tensor:
    """coremltools' palettize_weights on a plain array (the function its MIL pass calls per weight)."""
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    block = [group_size, 0] if granularity == "per_grouped_channel" else [0, 0]
    params = palettize_weights.blockwise_compress(w.numpy().astype(dtype), mode.upper(), bits, block)
    return torch.from_numpy(palettize_weights.decompress(params).astype(np.float32))


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"student_t3": torch.distributions.StudentT(3.0).sample((64, 768)) * 0.02,
            "laplace_rows": torch.distributions.Laplace(0, 0.02).sample((64, 768)) * torch.rand(64, 1) * 2}


@pytest.mark.parametrize("granularity", ["per_tensor", "per_grouped_channel"])
@pytest.mark.parametrize("bits", [2, 4])
def test_kmeans_mse_not_worse_than_coremltools(granularity: str, bits: int) -> None:
    for name, w in _tensors().items():
        rec = quantize_weight(w, KMeansConfig(bits=bits, granularity=granularity, group_size=16))
        ours = lut_mse(w, rec)
        ref = (coreml_palettize(w, bits, "kmeans", granularity) - w).pow(2).mean().item()
        assert ours <= ref * 1.01, (name, ours / ref)
        if granularity == "per_tensor" and bits == 2:    # also against its scikit-learn path (fp32 input)
            ref32 = (coreml_palettize(w, bits, "kmeans", granularity, dtype=np.float32) - w).pow(2).mean().item()
            assert ours <= ref32 * 1.01, (name, ours / ref32)


def test_indices_are_nearest_to_the_stored_fp16_lut() -> None:
    w = _tensors()["student_t3"]
    rec = quantize_weight(w, KMeansConfig(bits=3, granularity="per_grouped_channel", group_size=8))
    assert rec.lut.dtype == torch.float16 and rec.lut.shape == (8, 8) and rec.indices.dtype == torch.uint8
    rows = rec.lut.float().repeat_interleave(8, 0)                      # brute force over all 8 entries
    best = (w.unsqueeze(-1) - rows.unsqueeze(1)).abs().min(-1).values
    assert torch.equal((rec.dequantize() - w).abs(), best)


def test_uniform_matches_coremltools_uniform() -> None:
    w = _tensors()["laplace_rows"]
    for gran in ("per_tensor", "per_grouped_channel"):
        rec = quantize_weight(w, UniformConfig(bits=4, granularity=gran, group_size=16))
        x = w.reshape(rec.n_lut_groups, -1)
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        want = (lo + (hi - lo) * torch.arange(16) / 15).half().float()
        assert (rec.lut.float() - want).abs().max() <= 2 ** -10 * hi.abs().max()   # linspace up to fp16 rounding
        # coremltools computes its step in fp16 ((max-min)/15 rounded), so its LUT drifts up to ~1/2 ulp per
        # entry from linspace: the two MSEs agree to ~0.5%, either way round.
        ref = (coreml_palettize(w, 4, "uniform", gran) - w).pow(2).mean().item()
        assert abs(lut_mse(w, rec) / ref - 1) < 0.01
        # on its own LUT, nearest indices beat coremltools' formula round((w - min) / (max - min) * 15)
        ct_idx = ((x - lo) / (hi - lo) * 15).round().long()
        ct_style = torch.gather(rec.lut.float(), 1, ct_idx).reshape(w.shape)
        assert lut_mse(w, rec) <= (ct_style - w).pow(2).mean().item()


def test_weighted_kmeans_favours_important_weights() -> None:
    w = _tensors()["student_t3"][:16]
    big = w.abs() > w.abs().quantile(0.99)             # the outliers matter most (e.g. Fisher information)
    imp = torch.where(big, 1000.0, 1.0)
    plain = quantize_weight(w, KMeansConfig(bits=2, granularity="per_tensor"))
    weighted = quantize_weight(w, KMeansConfig(bits=2, granularity="per_tensor", weighted=True), importance=imp)
    err = lambda r, m: (r.dequantize() - w)[m].pow(2).mean()  # noqa: E731
    assert err(weighted, big) < 0.5 * err(plain, big)
    assert err(weighted, ~big) > err(plain, ~big)     # paid for by the unimportant ones
    with pytest.raises(MacqError, match="--weighted"):
        quantize_weight(w, KMeansConfig(weighted=True))


def test_few_distinct_values_and_empty_clusters() -> None:
    w = torch.tensor([-1.0, 0.25, 2.0]).repeat(32, 11)[:, :32]   # 3 distinct values, 8 clusters
    lut, idx = kmeans_lut(w.reshape(2, -1), bits=3, lut_dtype=torch.float32)
    assert torch.equal(torch.gather(lut, 1, idx.long()), w.reshape(2, -1))
    assert bool(torch.isfinite(lut).all())


def test_deterministic_and_shapes() -> None:
    w = _tensors()["laplace_rows"][:32]
    a = quantize_weight(w, KMeansConfig(bits=4, seed=3))
    b = quantize_weight(w, KMeansConfig(bits=4, seed=3))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.lut, b.lut)
    assert a.lut.shape == (2, 16) and a.shape == (32, 768)
    t = quantize_weight(w, KMeansConfig(bits=1, granularity="per_tensor", lut_dtype="float32"))
    assert t.lut.shape == (1, 2) and t.lut.dtype == torch.float32


def test_bad_inputs_raise_macq_error() -> None:
    with pytest.raises(MacqError, match="--bits 9"):
        KMeansConfig(bits=9)
    with pytest.raises(MacqError, match="--granularity"):
        UniformConfig(granularity="per_block")
    with pytest.raises(MacqError, match="--lut-dtype"):
        KMeansConfig(lut_dtype="int8")
    with pytest.raises(MacqError, match="--group-size 16 does not divide the output dim 40"):
        quantize_weight(torch.randn(40, 64), KMeansConfig())


@pytest.mark.slow
def test_real_layers_vs_coremltools() -> None:
    from macq.models import default_model_dir

    path = default_model_dir() / "model.safetensors"
    if not path.is_file():
        pytest.skip("default model not prepared")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.15.mlp.down_proj.weight"]
        ws = [f.get_tensor(n).float() for n in names]
    for w in ws:
        for gran in ("per_tensor", "per_grouped_channel"):
            for bits in (2, 3, 4):
                ours = lut_mse(w, quantize_weight(w, KMeansConfig(bits=bits, granularity=gran)))
                ref = (coreml_palettize(w, bits, "kmeans", gran) - w).pow(2).mean().item()
                assert ours <= ref * 1.01, (gran, bits, ours / ref)


# ------------------------------------------------------------------------------------------ exact solver

def _sse_all_assignments(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """float64 minimum of Σ w (x − c)² over every assignment of the points to k clusters (c = weighted means)."""
    import itertools

    best = float("inf")
    for a in itertools.product(range(k), repeat=x.numel()):
        a = torch.tensor(a)
        sse = sum(float((w[a == c] * (x[a == c] - (w[a == c] * x[a == c]).sum() / w[a == c].sum()) ** 2).sum())
                  for c in range(k) if bool((a == c).any()))
        best = min(best, sse)
    return best


@pytest.mark.parametrize("k, n, seed, weighted", [(2, 8, 0, False), (2, 8, 1, True), (3, 7, 2, True), (4, 6, 3, False)])
def test_exact_solver_reaches_the_brute_force_optimum(k, n, seed, weighted):
    from macq.quantizers.exact1d import exact_centroids

    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.StudentT(3.0).sample((1, n)) if seed % 2 else torch.randn(1, n, generator=g)
    w = torch.rand(1, n, generator=g) * 10 + 0.01 if weighted else torch.ones(1, n)
    c = exact_centroids(x, k, w if weighted else None)[0]
    assert c.shape == (k,) and bool((c[1:] >= c[:-1]).all())
    got = float((w[0].double() * (x[0].double()[:, None] - c[None]).pow(2).min(1).values).sum())
    assert got == pytest.approx(_sse_all_assignments(x[0].double(), w[0].double(), k), rel=1e-9, abs=1e-12)


def test_exact_solver_never_loses_to_lloyd_and_beats_it_on_heavy_tails() -> None:
    w = _tensors()["student_t3"]
    sse = {}
    for solver in ("exact", "lloyd"):
        cfg = KMeansConfig(bits=4, group_size=4, solver=solver, lut_dtype="float32")
        rec = quantize_weight(w, cfg)
        sse[solver] = (rec.dequantize() - w).double().pow(2).reshape(16, -1).sum(1)
    assert bool((sse["exact"] <= sse["lloyd"] * (1 + 1e-6)).all())          # optimal in every group
    assert float(sse["exact"].sum()) < float(sse["lloyd"].sum()) * (1 - 1e-5)   # Lloyd's local optima


def test_exact_solver_options_and_degenerate_groups() -> None:
    from macq.quantizers.exact1d import exact_centroids

    assert KMeansConfig.from_dict(KMeansConfig(solver="lloyd").to_dict()).solver == "lloyd"
    assert KMeansConfig().solver == "exact"
    with pytest.raises(MacqError, match="--solver kmeans1d"):
        KMeansConfig(solver="kmeans1d")
    x = torch.tensor([[-1.0, 0.25, 2.0, 2.0, 0.25, -1.0]])      # 3 distinct values, 8 clusters, 6 points
    c = exact_centroids(x, 8)
    assert c.shape == (1, 8) and bool(torch.isfinite(c).all())
    assert set(c[0].tolist()) == {-1.0, 0.25, 2.0}
    zero = exact_centroids(x, 2, torch.zeros_like(x))            # all-zero weights: solved unweighted
    assert torch.equal(zero, exact_centroids(x, 2))

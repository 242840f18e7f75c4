"""macq.analysis against independent references: published Lloyd-Max constants, scipy's gennorm / quad /
pearsonr / spearmanr, float64 recomputation from activations, and macq's own perplexity / agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy import stats as sps

from macq.analysis import bounds, stats
from macq.analysis.functional import input_grams, output_error, score
from macq.analysis.report import pareto_front
from macq.eval import agreement_from_reference, perplexity, reference_logprobs
from macq.tiny import tiny_model

# Max (1960), "Quantizing for minimum distortion", Table I: unit-variance Gaussian, N = 2, 4, 8, 16 levels.
MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}
MAX_LEVELS_16 = [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_gaussian_matches_max_table(bits):
    # Max's 4-decimal table; the exact 16-level optimum is 0.0095010 (checked against quad below), so rel 1e-3.
    assert bounds.lloyd_max_mse(2.0, bits) == pytest.approx(MAX_MSE[bits], rel=1e-3)


def test_lloyd_max_levels_and_quad():
    lv = np.array(bounds.lloyd_max_levels(2.0, 4))
    np.testing.assert_allclose(lv[8:], MAX_LEVELS_16, atol=1e-3)
    np.testing.assert_allclose(lv, -lv[::-1], atol=1e-9)
    # Independent MSE of those levels with midpoint cells, by numerical integration of the GGD density.
    for beta, bits in ((2.0, 4), (1.3, 3), (0.8, 2)):
        lv = np.array(bounds.lloyd_max_levels(beta, bits))
        t = np.concatenate([[-np.inf], (lv[1:] + lv[:-1]) / 2, [np.inf]])
        scale = bounds.ggd_alpha_for_unit_variance(beta)
        mse = sum(integrate.quad(lambda x, c=c: (x - c) ** 2 * sps.gennorm.pdf(x, beta, scale=scale), a, b,
                                 epsabs=1e-13)[0] for a, b, c in zip(t[:-1], t[1:], lv))
        assert bounds.lloyd_max_mse(beta, bits) == pytest.approx(mse, rel=1e-6)


def test_lloyd_max_laplacian_one_bit_closed_form():
    # Unit-variance Laplacian, 2 levels at ±E|x|: D = 1 − (E|x|)² = 1 − 1/2.
    assert bounds.lloyd_max_mse(1.0, 1) == pytest.approx(0.5, abs=1e-9)


def test_entropy_power_bound():
    assert bounds.entropy_power_ratio(2.0) == pytest.approx(1.0, abs=1e-12)
    for r in (2.0, 3.5, 4.25):
        assert bounds.shannon_lower_bound(0.3, 2.0, r) == pytest.approx(bounds.gaussian_bound(0.3, r), rel=1e-12)
    for beta in (0.7, 1.0, 1.5, 3.0):
        assert bounds.ggd_entropy(beta, 0.05) == pytest.approx(float(sps.gennorm.entropy(beta, scale=0.05)), abs=1e-10)
        assert bounds.entropy_power_ratio(beta) < 1.0  # the Gaussian maximises entropy at fixed variance
    # Laplacian: N/σ² = e/π in closed form.
    assert bounds.entropy_power_ratio(1.0) == pytest.approx(math.e / math.pi, rel=1e-12)


def test_gaps_definitions():
    g = bounds.gaps(variance=2.0, beta=2.0, rate=4.0, mse=2.0 * 0.009501008)
    assert g["gap_gauss_bits"] == pytest.approx(0.5 * math.log2(0.009501008 / 2 ** -8), rel=1e-9)
    assert g["gap_slb_bits"] == pytest.approx(g["gap_gauss_bits"], rel=1e-12)
    assert g["gap_lloyd_max_bits"] == pytest.approx(0.0, abs=1e-6)  # the 4-bit Lloyd-Max point itself at R = 4
    assert bounds.lloyd_max_rate(2.0, bounds.lloyd_max_mse(2.0, 3)) == pytest.approx(3.0, abs=1e-9)


@pytest.mark.parametrize("beta", [0.8, 1.3, 2.0, 3.0])
def test_ggd_fit_matches_scipy(beta):
    x = sps.gennorm.rvs(beta, scale=0.02, size=20000, random_state=np.random.default_rng(int(beta * 10)))
    ours = stats.fit_ggd(x, loc=0.0)
    b_ref, _, s_ref = sps.gennorm.fit(x, floc=0.0)
    assert ours["beta"] == pytest.approx(b_ref, rel=2e-3)
    assert ours["alpha"] == pytest.approx(s_ref, rel=2e-3)
    assert ours["nll"] == pytest.approx(-np.mean(sps.gennorm.logpdf(x, b_ref, scale=s_ref)), abs=1e-6)
    assert ours["beta"] == pytest.approx(beta, rel=0.05)


def test_weight_stats_and_hist_kl():
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=5, size=50000) * 0.01
    s = stats.weight_stats(torch.from_numpy(x))
    assert s["variance"] == pytest.approx(np.var(x), rel=1e-12)
    assert s["excess_kurtosis"] == pytest.approx(sps.kurtosis(x, fisher=True, bias=True), rel=1e-9)
    z = np.abs(x - x.mean()) / x.std()
    assert s["outlier_frac_3sigma"] == pytest.approx(np.mean(z > 3)) and s["outlier_frac_6sigma"] == np.mean(z > 6)
    assert s["ggd_beta"] < 2.0 and s["kl_hist_ggd"] < s["kl_hist_gauss"]  # heavy tails: GGD fits better
    np.testing.assert_allclose(stats.ggd_cdf(np.array([-0.02, 0.0, 0.013]), 1.4, 0.01, 0.001),
                               sps.gennorm.cdf([-0.02, 0.0, 0.013], 1.4, loc=0.001, scale=0.01), atol=1e-12)
    # Histogram KL against a hand recomputation with scipy's normal CDF on the same edges.
    mu, sd = x.mean(), x.std()
    edges = np.linspace(mu - 6 * sd, mu + 6 * sd, 121)
    p = np.concatenate([[np.sum(x < edges[0])], np.histogram(x, edges)[0], [np.sum(x > edges[-1])]]) / x.size
    c = sps.norm.cdf(edges, mu, sd)
    q = np.concatenate([[c[0]], np.diff(c), [1 - c[-1]]])
    m = p > 0
    assert s["kl_hist_gauss"] == pytest.approx(np.sum(p[m] * np.log(p[m] / q[m])), rel=1e-6)


def test_correlations_match_scipy():
    rng = np.random.default_rng(1)
    x = rng.lognormal(size=40)
    y = x ** 1.5 * rng.lognormal(sigma=0.8, size=40)
    y[:5] = y[5]  # ties for Spearman
    r, p = stats.pearson(np.log10(x), np.log10(y))
    ref = sps.pearsonr(np.log10(x), np.log10(y))
    assert r == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    rho, ps = stats.spearman(x, y)
    ref = sps.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic, abs=1e-12) and ps == pytest.approx(ref.pvalue, rel=1e-9)
    c = stats.correlation(x, y)
    assert c["loglog_slope"] == pytest.approx(sps.linregress(np.log10(x), np.log10(y)).slope, rel=1e-9)
    assert math.isnan(stats.pearson([1, 1, 1, 1], [1, 2, 3, 4])[0])


def test_output_error_from_gram_equals_activations():
    torch.manual_seed(0)
    x = torch.randn(300, 24, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    w = torch.randn(10, 24, dtype=torch.float64)
    w_hat = w + 0.05 * torch.randn_like(w)
    e = output_error(w.float(), w_hat.float(), (x.T @ x / x.shape[0]).float())
    d = (w_hat.float().double() - w.float().double())
    out_mse = float(((x @ d.T) ** 2).mean())
    assert e["output_mse"] == pytest.approx(out_mse, rel=1e-5)
    assert e["weight_mse"] == pytest.approx(float((d ** 2).mean()), rel=1e-9)
    rel_out = float(((x @ d.T) ** 2).sum() / ((x @ w.float().double().T) ** 2).sum())
    assert e["amplification"] == pytest.approx(rel_out / e["weight_rel"], rel=1e-5)


def test_input_grams_share_inputs_correctly():
    model = tiny_model("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
             "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    grams = input_grams(model, names, ids, batch_size=2)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hs = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
          for n in names]
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    for n in names:
        x = torch.cat(seen[n]).double()
        torch.testing.assert_close(grams[n].double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert not torch.equal(grams[names[0]], grams[names[3]])  # same kind, other layer: not aliased


def test_score_matches_perplexity_and_agreement():
    model = tiny_model("llama").eval()
    other = tiny_model("llama", seed=1).eval()
    ids = torch.randint(0, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(2))
    ref = reference_logprobs(model, ids, context=32)
    s = score(other, ids, ref)
    assert s["ppl"] == pytest.approx(perplexity(other, ids, context=32).ppl, rel=1e-5)
    ag = agreement_from_reference(ref, other, ids, context=32)
    assert s["kl"] == pytest.approx(ag.kl, rel=1e-6) and s["top1"] == ag.top1
    assert s["logits_mse"] == pytest.approx(ag.logits_mse, rel=1e-6)
    assert score(model, ids, ref)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_pareto_front():
    pts = [(10, 5.0), (5, 6.0), (6, 7.0), (20, 4.0), (5, 6.5)]
    assert pareto_front(pts) == [1, 0, 3]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_truncated_score_equals_full(arch):
    from macq.analysis.functional import LayerInputs, alone_effect

    model = tiny_model(arch).eval()
    ids = torch.randint(0, model.config.vocab_size, (90,), generator=torch.Generator().manual_seed(3))
    ref = reference_logprobs(model, ids, context=40)
    base = score(model, ids, ref)
    cache = LayerInputs(model, ids, ref)
    assert cache.enabled and len(cache.inputs) == 3
    name = "model.layers.1.mlp.down_proj"
    w = model.get_submodule(name).weight.detach()
    w_hat = w + 0.05 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
    full = alone_effect(model, {name: w_hat}, ids, ref, base)
    cut = alone_effect(model, {name: w_hat}, ids, ref, base, start=1, cache=cache)
    assert full["kl"] > 1e-6
    for k in ("kl", "logits_mse", "delta_ce"):
        assert cut[k] == pytest.approx(full[k], rel=1e-4, abs=1e-9)
    assert torch.equal(model.get_submodule(name).weight, w)  # restored
    assert len(model.model.layers) == model.config.num_hidden_layers

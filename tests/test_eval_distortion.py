"""Weight distortion and the Gaussian rate-distortion bound D(R) = sigma^2 2^(-2R)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from macq.eval import distortion_table, weight_distortion
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.record import AffineRecord
from macq.tiny import tiny_model

UNIFORM_ECSQ_GAP = 0.5 * math.log2(math.pi * math.e / 6)  # 0.2546 bits (Gish & Pierce, 1968)


def test_mse_sqnr_match_numpy():
    g = np.random.default_rng(0)
    w = g.standard_normal((64, 96)) * 0.05 + 0.01
    w_hat = w + g.standard_normal(w.shape) * 0.004
    got = weight_distortion(torch.tensor(w, dtype=torch.float32), torch.tensor(w_hat, dtype=torch.float32), 3.5)
    w32, h32 = w.astype(np.float32).astype(np.float64), w_hat.astype(np.float32).astype(np.float64)
    mse = np.mean((w32 - h32) ** 2)
    assert got["mse"] == pytest.approx(mse, rel=1e-9)
    assert got["sqnr_db"] == pytest.approx(10 * np.log10(np.mean(w32 ** 2) / mse), rel=1e-9)
    assert got["rd_bound_mse"] == pytest.approx(np.var(w32) * 2 ** -7, rel=1e-9)
    assert got["gap_bits"] == pytest.approx(0.5 * np.log2(mse / (np.var(w32) * 2 ** -7)), rel=1e-9)


def test_exact_reconstruction_has_no_distortion():
    w = torch.randn(8, 8)
    got = weight_distortion(w, w.clone(), 4.0)
    assert got["mse"] == 0.0 and got["sqnr_db"] == math.inf and got["gap_bits"] == -math.inf


def _lloyd_max(x: np.ndarray, levels: int, iters: int = 60) -> np.ndarray:
    """Test-local optimal fixed-rate scalar quantizer (Lloyd's algorithm), returns reconstructions."""
    c = np.quantile(x, (np.arange(levels) + 0.5) / levels)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        c = np.bincount(idx, weights=x, minlength=levels) / np.maximum(np.bincount(idx, minlength=levels), 1)
    return c[np.searchsorted((c[1:] + c[:-1]) / 2, x)]


@pytest.mark.parametrize("bits, lloyd_mse", [(1, 0.3634), (2, 0.1175), (3, 0.03454)])
def test_lloyd_max_on_gaussian_respects_the_bound(bits, lloyd_mse):
    x = np.random.default_rng(1).standard_normal(200_000)
    xq = _lloyd_max(x, 2 ** bits)
    got = weight_distortion(torch.from_numpy(x), torch.from_numpy(xq), float(bits))
    assert got["mse"] == pytest.approx(lloyd_mse, rel=0.03)  # Max (1960) table for the unit Gaussian
    assert got["mse"] >= got["rd_bound_mse"]
    assert got["gap_bits"] > 0.0


def test_entropy_coded_uniform_quantizer_sits_0254_bits_above_bound():
    """High-rate uniform scalar quantization of a Gaussian, rate = entropy of its codes: the gap is the
    space-filling loss 1/2 log2(pi e / 6). The rate is the exact entropy of the quantized N(0,1) (from the
    normal CDF), the distortion is measured; the grid is fine and unbounded, so no clipping overhead."""
    step = 2.0 ** (0.5 * math.log2(2 * math.pi * math.e) - 8)  # entropy ~ 8 bits
    x = np.random.default_rng(2).standard_normal(1_000_000)
    xq = np.round(x / step) * step
    k = np.arange(-int(8 / step), int(8 / step) + 1)
    p = norm.cdf((k + 0.5) * step) - norm.cdf((k - 0.5) * step)
    p = p[p > 0]
    rate = float(-(p * np.log2(p)).sum())
    assert rate == pytest.approx(8.0, abs=0.01)
    got = weight_distortion(torch.from_numpy(x), torch.from_numpy(xq), rate)
    assert got["mse"] == pytest.approx(step ** 2 / 12, rel=0.01)
    assert got["gap_bits"] == pytest.approx(UNIFORM_ECSQ_GAP, abs=0.01)


def test_fixed_rate_uniform_pays_for_its_range():
    """8-bit fixed-rate uniform grid over [-4 sigma, 4 sigma]: gap = log2(8) - 1/2 log2(12) ~ 1.21 bits."""
    x = np.random.default_rng(3).standard_normal(500_000)
    x = np.clip(x, -3.99, 3.99)  # keep clipping out of the measurement
    step = 8.0 / 256
    xq = (np.floor(x / step) + 0.5) * step
    got = weight_distortion(torch.from_numpy(x), torch.from_numpy(xq), 8.0)
    want = 0.5 * math.log2((step ** 2 / 12) / (x.var() * 2 ** -16))
    assert got["gap_bits"] == pytest.approx(want, rel=1e-3)
    assert got["gap_bits"] == pytest.approx(3 - 0.5 * math.log2(12), abs=0.02)


def _rtn(w: torch.Tensor, bits: int = 4, group: int = 32, transposed: bool = False) -> AffineRecord:
    """Test-local round-to-nearest asymmetric per-group quantizer, fp16 scales, integer zeros."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8).half()
    zero = torch.round(-lo / scale.float()).clamp(0, 2 ** bits - 1)
    q = torch.clamp(torch.round(g / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2 ** bits - 1)
    return AffineRecord(codes=q.reshape(out, inp).to(torch.uint8), scales=scale, bits=bits, group_size=group,
                        zeros=zero.to(torch.uint8), transposed=transposed)


def _quantize(model) -> QuantizedModel:
    from macq.models import is_conv1d

    records = {name: _rtn(get_weight(m).detach(), transposed=is_conv1d(m))
               for name, m in quantizable_modules(model).items()}
    return QuantizedModel.from_model(model, records)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_distortion_table_per_layer_and_overall(arch):
    model = tiny_model(arch, seed=0)
    qm = _quantize(model)
    rows = distortion_table(qm, model)
    layers, overall = rows[:-1], rows[-1]
    assert [r["name"] for r in layers] == list(qm.records) and overall["name"] == "(all)"
    tot_se = tot_s2 = 0.0
    for r in layers:
        w = get_weight(model.get_submodule(r["name"])).detach().double().numpy()
        wh = qm.records[r["name"]].dequantize().double().numpy()
        mse = np.mean((w - wh) ** 2)
        assert r["shape"] == w.shape
        assert r["bpw"] == pytest.approx(4 + (16 + 4) / 32)  # codes + fp16 scale + 4-bit zero per 32
        assert r["mse"] == pytest.approx(mse, rel=1e-9)
        assert r["gap_bits"] == pytest.approx(0.5 * np.log2(mse / (w.var() * 2 ** (-2 * r["bpw"]))), rel=1e-9)
        # RTN per group on (near) Gaussian weights sits above the Gaussian bound, not absurdly far.
        assert 0.0 < r["gap_bits"] < 2.0
        tot_se += ((w - wh) ** 2).sum()
        tot_s2 += (w ** 2).sum()
    n = sum(r["n"] for r in layers)
    assert overall["n"] == n == qm.n_quantized_weights()
    assert overall["mse"] == pytest.approx(tot_se / n, rel=1e-9)
    assert overall["sqnr_db"] == pytest.approx(10 * np.log10(tot_s2 / tot_se), rel=1e-9)
    assert overall["gap_bits"] == pytest.approx(sum(r["gap_bits"] * r["n"] for r in layers) / n, rel=1e-9)
    assert overall["bpw"] == pytest.approx(qm.bits_per_weight())

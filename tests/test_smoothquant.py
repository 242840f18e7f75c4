"""SmoothQuant W8A8 and simulated activation quantization on tiny models fed real text."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from macq.arch import arch_spec
from macq.data import calibration_samples
from macq.errors import MacqError
from macq.models import get_weight, quantizable_modules
from macq.quantizers import quantize_model as registry_quantize
from macq.quantizers.actquant import fake_quant_act, install_act_quant, remove_act_quant
from macq.quantizers.fold import fold_scales
from macq.quantizers.smoothquant import SmoothQuantConfig, quantize_model, smooth_model
from macq.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(tiny_tokenizer(), "tinystories", 8, 64, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return calibration_samples(tiny_tokenizer(), "tinystories", 4, 64, seed=123)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _kl(ref_logits, logits):
    a, b = F.log_softmax(ref_logits, -1), F.log_softmax(logits, -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


def _np_fake_quant(x: np.ndarray, bits: int, mode: str, scale: float | None = None) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    x = x.astype(np.float64)
    s = np.maximum(np.abs(x).max(-1, keepdims=True) / qmax, 1e-8) if mode == "per_token" else scale
    return np.clip(np.rint(x / s), -qmax - 1, qmax) * s


@pytest.mark.parametrize("mode,bits", [("per_token", 8), ("per_tensor_static", 8), ("per_token", 4)])
def test_fake_quant_matches_numpy(mode, bits):
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 20, 64)
    x[0, 0] = 0.0  # an all-zero token stays zero
    scale = 0.05 if mode == "per_tensor_static" else None   # saturates the large channels
    got = fake_quant_act(x, bits, mode, scale).double().numpy()
    want = _np_fake_quant(x.numpy(), bits, mode, scale)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.isfinite(got).all() and (got[0, 0] == 0).all()


def test_hooks_fake_quantize_linear_inputs():
    model = tiny_model("llama")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj"
    seen = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach().clone()))
    install_act_quant(model, {name: {"bits": 8, "mode": "per_token"}})
    with torch.no_grad():
        model(ids)
    h.remove()
    # The hook runs before this forward hook's view of the args: the input it recorded is on the int8 grid.
    x = seen["x"].double().numpy()
    np.testing.assert_allclose(x, _np_fake_quant(x, 8, "per_token"), rtol=1e-6, atol=1e-7)
    remove_act_quant(model)
    assert not any(hasattr(m, "_macq_act_quant") for m in model.modules())
    with pytest.raises(MacqError):
        install_act_quant(model, {name: {"bits": 8, "mode": "per_channel"}})
    with pytest.raises(MacqError):
        install_act_quant(model, {name: {"bits": 8, "mode": "per_tensor_static"}})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_smoothing_is_exact(arch, calib, held_out):
    model = tiny_model(arch)
    ref = _logits(model, held_out)
    stats = smooth_model(model, calib, alpha=0.5)
    assert any(v["folded"] for v in stats.values())
    out = _logits(model, held_out)
    assert (out - ref).norm() / ref.norm() < 1e-5


def _outlier_model(arch="llama", factor=50.0):
    """Functionally identical in float, but a few norm output channels are ×``factor`` (activation outliers)."""
    model = tiny_model(arch)
    spec = arch_spec(model)
    for layer in model.get_submodule(spec.layers):
        for m in spec.mappings:
            if m.prev.endswith("norm") or m.prev.startswith("ln_"):
                s = torch.ones(64)
                s[[3, 17, 40]] = 1.0 / factor
                fold_scales(layer, m, s)
    return model


def test_w8a8_close_to_fp_and_matches_to_torch(calib, held_out):
    model = tiny_model("qwen2")
    ref = _logits(model, held_out)
    qm = quantize_model(model, SmoothQuantConfig(), calib)
    assert set(qm.records) == set(qm.act_quant) == set(quantizable_modules(model))
    for name, rec in qm.records.items():
        assert rec.bits == 8 and rec.symmetric and rec.granularity == "per_channel"
        assert torch.equal(rec.dequantize(), get_weight(model.get_submodule(name)).detach())
    assert all(v == {"bits": 8, "mode": "per_token"} for v in qm.act_quant.values())
    out = _logits(model, held_out)
    assert _kl(ref, out) < 2e-3
    torch.testing.assert_close(_logits(qm.to_torch(), held_out), out, rtol=0, atol=0)
    remove_act_quant(model)  # weights-only W8 is closer still
    assert _kl(ref, _logits(model, held_out)) < _kl(ref, out)


@pytest.mark.parametrize("mode", ["per_token", "per_tensor_static"])
def test_smoothing_beats_no_smoothing_on_outliers(mode, calib, held_out):
    ref_model = _outlier_model()
    ref = _logits(ref_model, held_out)
    torch.testing.assert_close(ref, _logits(tiny_model("llama"), held_out), rtol=1e-4, atol=1e-4)
    kls = {}
    for smooth in (False, True):
        model = _outlier_model()
        qm = quantize_model(model, SmoothQuantConfig(smooth=smooth, act_mode=mode), calib)
        kls[smooth] = _kl(ref, _logits(model, held_out))
        if mode == "per_tensor_static":
            assert all(v["scale"] > 0 for v in qm.act_quant.values())
    assert kls[True] < 0.5 * kls[False], kls
    if smooth:
        ratios = [v for v in qm.method["stats"].values() if v["folded"]]
        assert all(r["act_outlier_ratio_after"] < r["act_outlier_ratio_before"] for r in ratios[:2])


def test_gpt2_and_registry(calib, held_out):
    model = tiny_model("gpt2")
    ref = _logits(model, held_out)
    qm = registry_quantize(model, "smoothquant", calib=calib, alpha=0.6, act_mode="per_tensor_static")
    assert all(r.transposed for r in qm.records.values())
    out = _logits(model, held_out)
    assert _kl(ref, out) < 5e-3
    torch.testing.assert_close(_logits(qm.to_torch(), held_out), out, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(alpha=1.5), dict(act_mode="per_channel"), dict(act_bits=1),
                                dict(weight_bits=9), dict(include_embeddings=True)])
def test_bad_config(kw):
    with pytest.raises(MacqError):
        SmoothQuantConfig(**kw)

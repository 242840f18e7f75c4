"""RTN against independent references: ``mx.quantize`` (float / MLX mode, bit-exact) and a float64 numpy
recomputation (symmetric and integer zero-point modes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from macq.errors import MacqError
from macq.quantizers.rtn import RTNConfig, quantize_weight

TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _weights(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """Row-scaled heavy-ish tails plus special groups (constant, all-zero, one outlier, all-negative)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 0.1
    w[0, :32] = 0.0
    w[1, :32] = 0.3
    w[2, :32] = -torch.rand(32, generator=g)
    w[3, 5] = 3.0
    return w


def _mlx_unpack(q: np.ndarray, bits: int, n: int) -> np.ndarray:
    """MLX's packing spec (PLATFORM.md), written independently: row = little-endian bit stream."""
    stream = np.unpackbits(q.astype("<u4").view(np.uint8), axis=-1, bitorder="little")[:, : n * bits]
    return (stream.reshape(q.shape[0], n, bits) * (1 << np.arange(bits))).sum(-1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_float_mode_equals_mx_quantize(dtype: str) -> None:
    mx = pytest.importorskip("mlx.core")
    mdt = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    for bits in (2, 3, 4, 5, 6, 8):
        for gs in (32, 64, 128):
            w = _weights(48, 256, seed=bits * 1000 + gs).to(TORCH_DT[dtype]).float()  # values exact in dtype
            rec = quantize_weight(w, RTNConfig(bits=bits, group_size=gs, symmetric=False, zero_point="float",
                                               scale_dtype=dtype))
            q, s, b = mx.quantize(mx.array(w.numpy()).astype(mdt), group_size=gs, bits=bits)
            where = f"{dtype} bits={bits} group={gs}"
            assert np.array_equal(_mlx_unpack(np.array(q), bits, 256), rec.codes.numpy()), where
            assert np.array_equal(np.array(s.astype(mx.float32)), rec.scales.float().numpy()), where
            assert np.array_equal(np.array(b.astype(mx.float32)), rec.biases.float().numpy()), where
            assert rec.scales.dtype == TORCH_DT[dtype] and rec.biases.dtype == TORCH_DT[dtype]
            if dtype == "float32":  # mx.dequantize runs in the weight dtype; compare where that is fp32
                ref = np.array(mx.dequantize(q, s, b, group_size=gs, bits=bits))
                assert np.array_equal(ref, rec.dequantize().numpy()), where


def _ref_grid(w: np.ndarray, bits: int, gs: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 numpy reference of grid.py's documented conventions, scales rounded to fp16."""
    out, inp = w.shape
    wg = w.astype(np.float64).reshape(out, inp // gs, gs)
    maxq = 2 ** bits - 1
    if symmetric:
        amax = np.abs(wg).max(-1)
        s = (2 * amax / maxq).astype(np.float16).astype(np.float64)
        z = np.full_like(s, 2 ** (bits - 1))
    else:
        lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
        s = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)
        z = np.clip(np.round(-lo / s), 0, maxq)
    ratio = wg / s[..., None]
    q = np.clip(np.round(ratio) + z[..., None], 0, maxq)
    return q.reshape(out, inp), s, ratio.reshape(out, inp)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_modes_match_float64_reference(symmetric: bool, bits: int) -> None:
    w = _weights(64, 256, seed=bits)
    gs = 64
    rec = quantize_weight(w, RTNConfig(bits=bits, group_size=gs, symmetric=symmetric, zero_point="int"))
    q_ref, s_ref, ratio = _ref_grid(w.numpy(), bits, gs, symmetric)
    assert np.array_equal(rec.scales.float().numpy(), s_ref)
    mism = rec.codes.numpy() != q_ref
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5  # fp32 vs fp64 may round a tie apart
    assert not (mism & ~near_tie).any()
    assert mism.mean() < 1e-3
    deq64 = (s_ref[..., None] * (q_ref.reshape(64, 4, gs) - (
        2 ** (bits - 1) if symmetric else rec.zeros.numpy()[..., None]))).reshape(64, 256)
    assert np.allclose(rec.dequantize().numpy()[~mism], deq64[~mism], rtol=0, atol=1e-6)
    if not symmetric:
        assert rec.zeros is not None and rec.biases is None
        assert np.array_equal(rec.zeros.numpy(), _ref_zero(w.numpy(), bits, gs))


def _ref_zero(w: np.ndarray, bits: int, gs: int) -> np.ndarray:
    wg = w.astype(np.float64).reshape(w.shape[0], -1, gs)
    lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
    s = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float64)
    return np.clip(np.round(-lo / s), 0, 2 ** bits - 1).astype(np.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_uses_all_levels(bits: int) -> None:
    # grid.py: s = 2·absmax/(2^b-1) with implicit zero 2^(b-1), so both w = -absmax and w = +absmax reach the
    # rails (codes 0 and 2^b-1, i.e. signed [-2^(b-1), 2^(b-1)-1]) and every level in between is used.
    w = torch.linspace(-1, 1, 4096).repeat(4, 1) * torch.tensor([[0.5], [1.0], [2.0], [3.0]])
    w = w[:, torch.randperm(4096, generator=torch.Generator().manual_seed(1))]
    rec = quantize_weight(w, RTNConfig(bits=bits, group_size=4096, symmetric=True))
    for row in rec.codes:
        assert torch.equal(row.unique(), torch.arange(2 ** bits, dtype=torch.uint8))
    assert rec.symmetric and rec.zeros is None and rec.biases is None


@pytest.mark.parametrize("mode", [dict(symmetric=True), dict(symmetric=False, zero_point="int"),
                                  dict(symmetric=False, zero_point="float")])
def test_mse_clip_never_worse_per_group(mode: dict) -> None:
    w = torch.distributions.StudentT(2.5).sample((32, 512)) * 0.02
    plain = quantize_weight(w, RTNConfig(bits=3, group_size=64, **mode))
    clipped = quantize_weight(w, RTNConfig(bits=3, group_size=64, mse_clip=True, **mode))
    err = lambda r: (r.dequantize() - w).pow(2).view(32, 8, 64).sum(-1)  # noqa: E731
    assert (err(clipped) <= err(plain)).all()
    assert err(clipped).sum() < 0.9 * err(plain).sum()  # heavy tails: clipping must actually help


def test_granularity_shapes() -> None:
    w = _weights(24, 128)
    t = quantize_weight(w, RTNConfig(group_size=-1, symmetric=False))
    assert t.per_tensor and t.scales.shape == (1, 1) and t.zeros.shape == (1, 1) and t.granularity == "per_tensor"
    c = quantize_weight(w, RTNConfig(group_size=0))
    assert c.scales.shape == (24, 1) and c.group_size == 128 and c.granularity == "per_channel"
    g = quantize_weight(w, RTNConfig(group_size=32, symmetric=False, zero_point="float", scale_dtype="bfloat16"))
    assert g.scales.shape == g.biases.shape == (24, 4) and g.zeros is None and g.scales.dtype == torch.bfloat16
    # per-tensor uses one scale for everything: its error is at least per-channel's on row-scaled weights
    assert (t.dequantize() - w).pow(2).sum() >= (quantize_weight(w, RTNConfig(group_size=0, symmetric=False))
                                                  .dequantize() - w).pow(2).sum()


def test_bad_inputs_raise_macq_error() -> None:
    with pytest.raises(MacqError, match="--bits 9: rtn supports 2, 3, 4, 5, 6, 8"):
        RTNConfig(bits=9)
    with pytest.raises(MacqError, match="--group-size -2"):
        RTNConfig(group_size=-2)
    with pytest.raises(MacqError, match="--zero-point"):
        RTNConfig(zero_point="half")
    with pytest.raises(MacqError, match="--scale-dtype"):
        RTNConfig(scale_dtype="int8")
    with pytest.raises(MacqError, match="--group-size 100 does not divide the input dim 576"):
        quantize_weight(torch.randn(8, 576), RTNConfig(group_size=100))


def test_gpt2_end_to_end_save_load(tmp_path) -> None:
    from macq.models import get_weight
    from macq.qmodel import QuantizedModel
    from macq.quantizers import quantize_model
    from macq.tiny import tiny_model

    model = tiny_model("gpt2")
    qm = quantize_model(model, "rtn", bits=4, group_size=32)
    assert qm.method["method"] == "rtn" and len(qm.records) == 8  # 2 layers x (c_attn, c_proj, c_fc, mlp.c_proj)
    for name, rec in qm.records.items():
        assert rec.transposed                                     # GPT-2 Conv1D stores [in, out]
        w = get_weight(model.get_submodule(name)).float()
        assert rec.shape == tuple(w.shape)
        rel = (rec.dequantize() - w).norm() / w.norm()
        assert 0 < rel < 0.15, name
    qm.save(tmp_path / "q")
    back = QuantizedModel.load(tmp_path / "q")
    assert back.records.keys() == qm.records.keys()
    for name, rec in qm.records.items():
        b = back.records[name]
        assert torch.equal(b.codes, rec.codes) and torch.equal(b.scales, rec.scales) and b.transposed
    m2 = back.to_torch()
    name = next(iter(qm.records))
    assert torch.equal(get_weight(m2.get_submodule(name)).float(), qm.records[name].dequantize())

"""MLX's float modes (mxfp4, nvfp4, mxfp8): RTN records equal ``mx.quantize`` byte for byte on random and
adversarial weights, records dequantize to what ``mx.dequantize`` gives, and round-trip through storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from macq.errors import MacqError
from macq.microscale import E4M3_TABLE, encode_e4m3
from macq.packing import pack_bits, unpack_bits
from macq.quantizers.rtn import RTNConfig, quantize_weight
from macq.record import FPRecord, bits_per_weight, record_from_tensors

mx = pytest.importorskip("mlx.core")

MODES = ("mxfp4", "nvfp4", "mxfp8")
KINDS = ("randn", "heavy", "zeros", "subnormal", "huge", "ties")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def _weights(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(KINDS.index(kind))
    n = (48, 256)
    if kind == "randn":
        return torch.randn(n, generator=g) * 0.05
    if kind == "heavy":          # blocks whose absmax sits far from the rest
        return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2)
    if kind == "zeros":
        w = torch.randn(n, generator=g)
        w[::2] = 0.0
        w[1::4, :64] = -0.0
        return w
    if kind == "subnormal":      # fp16-subnormal sized: scales underflow (nvfp4's E4M3 scale rounds to 0)
        return torch.randn(n, generator=g) * 1e-6
    if kind == "huge":           # past E4M3's 448 and near fp16's max
        return torch.randn(n, generator=g) * 2e4
    if kind == "ties":           # exact midpoints of the E2M1 / E4M3 grids at many scales
        q = torch.randint(-56, 57, n, generator=g).float() / 8
        return q * 2.0 ** torch.randint(-10, 6, (n[0], 1), generator=g).float()
    raise AssertionError(kind)


def _mlx(w: torch.Tensor, mode: str, dtype: str):
    q, s = mx.quantize(mx.array(w.numpy()).astype(DTYPES[dtype]), mode=mode)
    return np.array(q), np.array(s)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
def test_rtn_equals_mx_quantize(mode, dtype, kind):
    w = _weights(kind)
    if dtype == "float16" and kind == "huge":
        w = w.clamp(-6e4, 6e4)
    rec = quantize_weight(w, RTNConfig(mode=mode, scale_dtype=dtype))
    q, s = _mlx(w, mode, dtype)
    np.testing.assert_array_equal(pack_bits(rec.codes, rec.bits).numpy(), q)
    np.testing.assert_array_equal(rec.scales.numpy(), s)


@pytest.mark.parametrize("mode", MODES)
def test_record_dequantizes_as_mlx(mode):
    """float32 run: mx.dequantize is exact there, so the record's exact value must equal it everywhere."""
    w = _weights("heavy")
    rec = quantize_weight(w, RTNConfig(mode=mode, scale_dtype="float32"))
    q, s = mx.quantize(mx.array(w.numpy()), mode=mode)
    ref = np.array(mx.dequantize(q, s, mode=mode, dtype=mx.float32))
    np.testing.assert_array_equal(rec.dequantize().numpy(), ref)
    assert float((rec.dequantize() - w).abs().max()) > 0   # a real rounding happened


@pytest.mark.parametrize("mode", MODES)
def test_record_round_trips_and_counts_bits(mode):
    rec = quantize_weight(_weights("randn"), RTNConfig(mode=mode))
    back = record_from_tensors(rec.meta(), rec.to_tensors())
    assert isinstance(back, FPRecord) and back.mode == mode
    assert torch.equal(back.codes, rec.codes) and torch.equal(back.scales, rec.scales)
    assert bits_per_weight(rec) == rec.bits + 8 / rec.group_size   # 4.25 / 4.5 / 8.25


def test_e4m3_encoder_saturates_like_mlx():
    x = torch.cat([torch.randn(20000) * 300, torch.tensor([447.9, 448.0, 460.0, 1e9, float("inf"), -float("inf"),
                                                           0.0, -0.0, 2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -11])])
    np.testing.assert_array_equal(encode_e4m3(x).numpy(), np.array(mx.to_fp8(mx.array(x.numpy()))))
    ref = np.array(mx.from_fp8(mx.array(np.arange(256, dtype=np.uint8)), mx.float32))
    np.testing.assert_array_equal(np.nan_to_num(E4M3_TABLE.numpy(), nan=7.0), np.nan_to_num(ref, nan=7.0))


def test_float_mode_fixes_bits_and_group():
    cfg = RTNConfig(mode="mxfp8")
    assert (cfg.bits, cfg.group_size) == (8, 32)
    assert RTNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(MacqError, match="--group-size 64: --mode nvfp4 stores 4-bit codes with one scale per 16"):
        RTNConfig(mode="nvfp4", group_size=64)
    with pytest.raises(MacqError, match="--bits 3: --mode mxfp4"):
        RTNConfig(mode="mxfp4", bits=3)
    with pytest.raises(MacqError, match="--mode 'fp4': expected one of affine, mxfp4, nvfp4, mxfp8"):
        RTNConfig(mode="fp4")
    with pytest.raises(MacqError, match="block of 32 does not divide the input dim 48"):
        quantize_weight(torch.randn(4, 48), RTNConfig(mode="mxfp4"))


def test_record_refuses_nan_bytes_and_bad_shapes():
    codes = torch.zeros(2, 32, dtype=torch.uint8)
    with pytest.raises(MacqError, match="E8M0 NaN pattern"):
        FPRecord(codes=codes, scales=torch.full((2, 1), 255, dtype=torch.uint8), mode="mxfp4")
    with pytest.raises(MacqError, match="E4M3 NaN pattern 0x7F"):
        FPRecord(codes=codes + 0x7F, scales=torch.full((2, 1), 127, dtype=torch.uint8), mode="mxfp8")
    with pytest.raises(MacqError, match=r"values in \[16, 16\] do not fit 4 bits"):
        FPRecord(codes=codes + 16, scales=torch.full((2, 1), 127, dtype=torch.uint8), mode="mxfp4")
    with pytest.raises(MacqError, match=r"scales has shape \(2, 1\), expected \(2, 2\)"):
        FPRecord(codes=codes, scales=torch.zeros(2, 1, dtype=torch.uint8), mode="nvfp4")
    with pytest.raises(MacqError, match="dtype float16, expected uint8"):
        FPRecord(codes=codes, scales=torch.zeros(2, 1, dtype=torch.float16), mode="mxfp4")
    assert unpack_bits(pack_bits(codes, 4), 4, 32).shape == (2, 32)


def _hessian(n: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.3 + torch.eye(n))
    return 2 / x.shape[0] * x.T.double() @ x.double()


def _out_err(rec, w: torch.Tensor, H: torch.Tensor) -> float:
    d = rec.dequantize().double() - w.double()
    return float(((d @ H) * d).sum())


@pytest.mark.parametrize("mode", MODES)
def test_gptq_on_float_grids_beats_rtn_output_error(mode):
    """GPTQ in a float mode: an FPRecord on that mode's grid whose layer-output error tr(ΔW H ΔWᵀ), recomputed
    here in float64 from the record, is well below RTN's (mx.quantize's) on correlated inputs."""
    from macq.quantizers.gptq import GPTQConfig, gptq_quantize

    H = _hessian()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    rtn = quantize_weight(w, RTNConfig(mode=mode))
    for mse in (False, True):
        rec, stats = gptq_quantize(w, H, GPTQConfig(mode=mode, mse_clip=mse))
        assert isinstance(rec, FPRecord) and rec.mode == mode
        ours = _out_err(rec, w, H)
        assert ours == pytest.approx(stats["out_err"], rel=1e-5)   # the stat comes from the float32 solve
        assert ours < 0.75 * _out_err(rtn, w, H), (mode, mse)


@pytest.mark.parametrize("mode", MODES)
def test_mse_scale_search_is_never_worse_per_block(mode):
    from macq.microscale import fp_format

    g = fp_format(mode).group_size
    for kind in ("heavy", "randn"):
        w = (_weights(kind) * (0.01 if kind == "heavy" else 1.0)).half().float()   # the values both quantizers see (scale_dtype float16)
        plain = quantize_weight(w, RTNConfig(mode=mode))
        mse = quantize_weight(w, RTNConfig(mode=mode, mse_clip=True))
        err = lambda r: ((r.dequantize() - w).abs().double() ** 2.4).view(w.shape[0], -1, g).sum(-1)  # noqa: E731
        assert bool((err(mse) <= err(plain) * (1 + 1e-9)).all())
        if mode != "mxfp8" and kind == "randn":   # E4M3 elements: the scale hardly matters (relative grid)
            assert float(err(mse).sum()) < 0.97 * float(err(plain).sum())


def test_streamed_row_blocks_reassemble_float_records(monkeypatch):
    """The streaming engine quantizes big tensors in row blocks: a float-mode record comes back whole and equal."""
    import macq.streaming as st

    monkeypatch.setattr(st, "ROW_BLOCK_ELEMS", 256 * 10)
    w = _weights("randn")
    for mode in MODES:
        whole = quantize_weight(w, RTNConfig(mode=mode))
        blocks = st.quantize_tensor(w, "rtn", RTNConfig(mode=mode), quantize_weight)
        assert isinstance(blocks, FPRecord) and blocks.mode == mode
        assert torch.equal(blocks.codes, whole.codes) and torch.equal(blocks.scales, whole.scales)

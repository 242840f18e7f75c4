"""MLX layout of single records: packing equals mx.quantize's own, refusals name the layer, the only loss
of the zero-point -> bias mapping is the bias's storage rounding (none for symmetric records)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")

from macq.errors import MacqError  # noqa: E402
from macq.packing import unpack_bits  # noqa: E402
from macq.quantizers.grid import affine_params, quantize_codes  # noqa: E402
from macq.record import AffineRecord, LUTRecord  # noqa: E402
from mlx_backend.layout import MLX_BITS, MLX_GROUPS, affine_tensors, layer_layout, mlx_quantize_record  # noqa: E402

_MX = {torch.float16: mx.float16, torch.bfloat16: mx.bfloat16, torch.float32: mx.float32}


def _np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype != mx.uint32 else np.array(a)


def grid_record(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> AffineRecord:
    """Integer zero-point (or symmetric) record from macq's grid maths, fp16 scales."""
    out, inp = w.shape
    wg = w.view(out, inp // group, group)
    s, z, b = affine_params(wg, bits, symmetric, "int")
    codes = quantize_codes(wg, s, z, b, bits).view(out, inp)
    return AffineRecord(codes=codes, scales=s.half(), zeros=z, bits=bits, group_size=group)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layout_equals_mx_quantize_for_every_bits_and_group(dtype):
    """mx.quantize -> (unpacked codes, scales, biases) as a record -> our layout == mx.quantize's arrays,
    bit for bit; and macq's own dequantization of the record equals mx.dequantize (fp32)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 384, generator=g)
    for bits in MLX_BITS:
        for group in MLX_GROUPS:
            ref_w, ref_s, ref_b = mx.quantize(mx.array(w.numpy()).astype(_MX[dtype]), group, bits)
            rec = mlx_quantize_record(w, bits, group, dtype)
            out = layer_layout("m", rec, dtype)
            assert out.qparams == {"group_size": group, "bits": bits, "mode": "affine"}
            t = out.tensors
            assert t["weight"].dtype == torch.uint32 and t["scales"].dtype == dtype
            np.testing.assert_array_equal(t["weight"].numpy(), np.array(ref_w), err_msg=f"{bits}b g{group}")
            np.testing.assert_array_equal(t["scales"].float().numpy(), _np(ref_s))
            np.testing.assert_array_equal(t["biases"].float().numpy(), _np(ref_b))
            deq32 = mx.dequantize(ref_w, ref_s.astype(mx.float32), ref_b.astype(mx.float32), group, bits)
            np.testing.assert_array_equal(rec.dequantize().numpy(), np.array(deq32))


def test_pack_matches_mlx_bit_stream_independently():
    """Codes chosen by us (not by mlx) packed by us: mx.dequantize with s=1, b=0 reads them back."""
    g = torch.Generator().manual_seed(1)
    for bits in MLX_BITS:
        codes = torch.randint(0, 2 ** bits, (8, 256), generator=g, dtype=torch.uint8)
        rec = AffineRecord(codes=codes, scales=torch.ones(8, 8), biases=torch.zeros(8, 8), bits=bits, group_size=32)
        t = affine_tensors(rec, torch.float32)
        back = mx.dequantize(mx.array(t["weight"].numpy()), mx.array(t["scales"].numpy()),
                             mx.array(t["biases"].numpy()), 32, bits)
        np.testing.assert_array_equal(np.array(back), codes.float().numpy())
        assert torch.equal(unpack_bits(t["weight"], bits, 256), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bias_rounding_bound(bits):
    """Symmetric: stored bias == -s*2^(b-1) exactly. Integer zero-point: |stored - exact| <= half an fp16 ulp
    of the bias. float32 storage: exact for both."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits))
    for symmetric in (True, False):
        rec = grid_record(w, bits, 64, symmetric)
        exact = rec.effective_biases().double()
        t16 = affine_tensors(rec, torch.float16)
        t32 = affine_tensors(rec, torch.float32)
        assert torch.equal(t16["scales"].float(), rec.scales.float())           # fp16 scales survive
        assert torch.equal(t32["biases"].double(), exact)                         # fp32: exact
        err = (t16["biases"].double() - exact).abs()
        if symmetric:
            assert err.max().item() == 0.0
        else:
            ulp = torch.from_numpy(np.spacing(np.abs(t16["biases"].numpy()))).double()
            assert (err <= ulp / 2).all()


def test_refusals_name_the_layer_and_what_mlx_supports():
    w = torch.randn(16, 256)
    codes = torch.zeros(16, 256, dtype=torch.uint8)
    cases = {
        "per-tensor": AffineRecord(codes=codes, scales=torch.ones(1, 1), bits=4, group_size=256, per_tensor=True),
        "7-bit": AffineRecord(codes=codes, scales=torch.ones(16, 16), bits=7, group_size=16 * 1),
        "group_size=16": AffineRecord(codes=codes, scales=torch.ones(16, 16), bits=4, group_size=16),
        "per-channel": AffineRecord(codes=codes, scales=torch.ones(16, 1), bits=4, group_size=256),
    }
    for what, rec in cases.items():
        with pytest.raises(MacqError) as e:
            layer_layout("model.layers.3.mlp.up_proj", rec, torch.float16)
        msg = str(e.value)
        assert "model.layers.3.mlp.up_proj" in msg and "32,64,128" in msg and "2,3,4,5,6,8" in msg, msg
    # per-channel over an input dim MLX supports as a group is representable
    ok = layer_layout("x", grid_record(w[:, :64], 4, 64, True), torch.float16)
    assert ok.qparams["group_size"] == 64


def test_lut_refused_without_flag_and_requantized_with_it():
    g = torch.Generator().manual_seed(2)
    rec = LUTRecord(indices=torch.randint(0, 16, (16, 128), generator=g, dtype=torch.uint8),
                    lut=torch.randn(2, 16, generator=g), bits=4)
    with pytest.raises(MacqError, match="rtn, gptq, awq"):
        layer_layout("lm", rec, torch.float16)
    out = layer_layout("lm", rec, torch.float16, requant=(4, 64))
    assert out.qparams == {"group_size": 64, "bits": 4, "mode": "affine"} and "re-quantized" in out.note
    ref = mlx_quantize_record(rec.dequantize(), 4, 64, torch.float16)
    np.testing.assert_array_equal(out.tensors["weight"].numpy(), affine_tensors(ref, torch.float16)["weight"].numpy())
    stays = layer_layout("lm", LUTRecord(indices=rec.indices[:, :96], lut=rec.lut, bits=4), torch.float16,
                         requant=(4, 64))
    assert stays.qparams is None and stays.tensors["weight"].shape == (16, 96)

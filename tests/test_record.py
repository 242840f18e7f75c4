"""The quantized-weight record: exact dequantization, honest bits per weight, lossless (de)serialisation."""

import numpy as np
import pytest
import torch

from macq.errors import MacqError
from macq.packing import pack_bits, unpack_bits
from macq.record import AffineRecord, DoubleQuant, LUTRecord, bits_per_weight, record_from_tensors


def _affine(bits=4, g=32, out=8, inp=64, form="zeros", seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out, inp), generator=gen).to(torch.uint8)
    scales = (torch.rand(out, inp // g, generator=gen) + 0.1).half()
    kw = {}
    if form == "zeros":
        kw["zeros"] = torch.randint(0, 2 ** bits, (out, inp // g), generator=gen).float()
    elif form == "biases":
        kw["biases"] = torch.randn(out, inp // g, generator=gen).half()
    return AffineRecord(codes=codes, scales=scales, bits=bits, group_size=g, **kw)


@pytest.mark.parametrize("form", ["zeros", "biases", "symmetric"])
def test_affine_dequantize_matches_float64_loop(form):
    r = _affine(form=form)
    c = r.codes.numpy().astype(np.float64)
    s = r.scales.double().numpy()
    ref = np.empty_like(c)
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            k = j // r.group_size
            if form == "zeros":
                ref[i, j] = s[i, k] * (c[i, j] - r.zeros[i, k].item())
            elif form == "biases":
                ref[i, j] = s[i, k] * c[i, j] + r.biases[i, k].double().item()
            else:
                ref[i, j] = s[i, k] * (c[i, j] - 2 ** (r.bits - 1))
    np.testing.assert_allclose(r.dequantize(torch.float64).numpy(), ref, rtol=1e-6, atol=1e-6)


def test_affine_bits_per_weight_charges_metadata():
    r = _affine(bits=4, g=32, form="zeros")          # 4 + 16/32 (fp16 scale) + 4/32 (int zero)
    assert bits_per_weight(r) == pytest.approx(4 + 16 / 32 + 4 / 32)
    r = _affine(bits=3, g=64, form="biases")         # MLX form: fp16 scale + fp16 bias per group
    assert bits_per_weight(r) == pytest.approx(3 + 32 / 64)
    r = _affine(bits=8, g=64, form="symmetric")
    assert bits_per_weight(r) == pytest.approx(8 + 16 / 64)


def test_per_tensor_and_shape_validation():
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    r = AffineRecord(codes=codes + 3, scales=torch.tensor([[0.5]]), bits=2, group_size=8, per_tensor=True)
    assert r.granularity == "per_tensor"
    assert torch.equal(r.dequantize(), torch.full((4, 8), 0.5 * (3 - 2)))
    with pytest.raises(MacqError, match="group_size"):
        AffineRecord(codes=codes, scales=torch.ones(4, 3), bits=4, group_size=3)
    with pytest.raises(MacqError, match="scales has shape"):
        AffineRecord(codes=codes, scales=torch.ones(4, 2), bits=4, group_size=8)


def test_lut_dequantize_grouped_channels_and_block_scales():
    gen = torch.Generator().manual_seed(1)
    out, inp, bits = 8, 64, 3
    idx = torch.randint(0, 8, (out, inp), generator=gen).to(torch.uint8)
    lut = torch.randn(4, 8, generator=gen).half()                    # 4 groups of 2 output channels
    scales = torch.rand(out, inp // 16, generator=gen) + 0.5
    r = LUTRecord(indices=idx, lut=lut, bits=bits, scales=scales, block_size=16)
    w = r.dequantize(torch.float64).numpy()
    for i in range(out):
        for j in range(inp):
            want = lut[i // 2, int(idx[i, j])].double().item() * scales[i, j // 16].double().item()
            assert w[i, j] == pytest.approx(want, rel=1e-6)
    # indices at 3 bits + 4 LUTs of 8 fp16 + fp32 block scales
    assert r.storage_bits() == out * inp * 3 + 4 * 8 * 16 + out * (inp // 16) * 32


def test_double_quant_dequantize():
    codes = torch.arange(10, dtype=torch.uint8)
    code_lut = torch.linspace(-1, 1, 256)
    dq = DoubleQuant(codes=codes, code_lut=code_lut, absmax=torch.tensor([2.0, 3.0]), offset=0.25, block_size=8)
    want = code_lut[codes.long()] * torch.tensor([2.0] * 8 + [3.0] * 2) + 0.25
    assert torch.allclose(dq.dequantize(), want)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [32, 64, 100, 576])
def test_pack_roundtrip_and_bitstream_layout(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2 ** bits, (3, n), generator=gen).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, (n * bits + 31) // 32)
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    # Independent reference: build the little-endian bit stream with Python integers.
    row = codes[1].tolist()
    stream = sum(int(c) << (j * bits) for j, c in enumerate(row))
    words = [(stream >> (32 * k)) & 0xFFFFFFFF for k in range(packed.shape[1])]
    assert packed[1].numpy().astype(np.uint64).tolist() == words


@pytest.mark.parametrize("make", [
    lambda: _affine(form="zeros"), lambda: _affine(bits=3, form="biases"), lambda: _affine(bits=6, form="symmetric"),
    lambda: LUTRecord(indices=torch.randint(0, 16, (4, 64)).to(torch.uint8), lut=torch.randn(1, 16), bits=4,
                      double_quant=DoubleQuant(codes=torch.randint(0, 256, (16,)).to(torch.uint8),
                                               code_lut=torch.linspace(-1, 1, 256), absmax=torch.rand(1),
                                               offset=0.1), block_size=16),
])
def test_serialisation_roundtrip(make):
    r = make()
    r2 = record_from_tensors(r.meta(), r.to_tensors())
    assert torch.equal(r.dequantize(), r2.dequantize())
    assert r.storage_bits() == r2.storage_bits()


def test_record_to_moves_every_tensor_there_and_back():
    """A record's tensors (a nested DoubleQuant's too) on the stand-in accelerator, dequantized there to the CPU's
    values, and back; a record already in place is returned as it is."""
    from dataclasses import fields

    from macq.record import record_to
    from tests.vdevice import ACC, accelerator

    gen = torch.Generator().manual_seed(2)
    aff = AffineRecord(codes=torch.randint(0, 16, (4, 64), generator=gen).to(torch.uint8),
                       scales=torch.rand(4, 2, generator=gen).half() + 0.5, bits=4, group_size=32,
                       zeros=torch.randint(0, 16, (4, 2), generator=gen).to(torch.uint8))
    lut = LUTRecord(indices=torch.randint(0, 8, (4, 64), generator=gen).to(torch.uint8),
                    lut=torch.randn(2, 8, generator=gen).half(), bits=3,
                    outlier_pos=torch.tensor([3, 70, 200]), outlier_values=torch.randn(3, generator=gen).half())
    dq = DoubleQuant(codes=torch.arange(10, dtype=torch.uint8), code_lut=torch.linspace(-1, 1, 256),
                     absmax=torch.tensor([2.0, 3.0]), offset=0.25, block_size=8)
    assert record_to(aff, "cpu") is aff and record_to(dq, torch.device("cpu")) is dq
    with accelerator() as acc:
        for rec in (aff, lut, dq):
            there = record_to(rec, ACC)
            tensors = [getattr(there, f.name) for f in fields(there) if isinstance(getattr(there, f.name), torch.Tensor)]
            assert tensors and all(t.device == ACC for t in tensors)
            assert torch.equal(there.dequantize().cpu(), rec.dequantize())
            back = record_to(there, "cpu")
            assert all(torch.equal(getattr(back, f.name), getattr(rec, f.name)) for f in fields(rec)
                       if isinstance(getattr(rec, f.name), torch.Tensor))
    assert acc.mismatches == []

"""NF4 / FP4 against bitsandbytes on CPU (the reference implementation), bit for bit.

Tolerance: none. macq follows bnb's CPU arithmetic op for op (fp32 absmax, multiply by the reciprocal,
midpoint bucketing; for double quant bnb's 65536-bin table, which is *not* always the nearest 8-bit code),
so indices, absmaxes, double-quant codes and the dequantized tensor in fp32/fp16/bf16 are all equal.
"""

from __future__ import annotations

import pytest
import torch

from macq.errors import MacqError
from macq.quantizers.normalfloat import FP4Config, NF4Config, code_table, dynamic_map, quantize_weight
from macq.record import bits_per_weight

F = pytest.importorskip("bitsandbytes.functional")

CONFIGS = {"nf4": NF4Config, "fp4": FP4Config}


def _weight(out: int, inp: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((out, inp)) * 0.03 * torch.rand(out, 1, generator=g)
    w[0, :64] = 0.0            # an all-zero block
    w[1, :64] = -0.5           # a constant block
    return w.to(dtype)


def _bnb_nibbles(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """bnb packs two codes per byte, the *first* element in the high nibble."""
    b = packed.view(-1)
    return torch.stack([b >> 4, b & 0xF], -1).view(shape)


def test_tables_equal_bnb() -> None:
    assert torch.equal(code_table("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_table("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_equals_bitsandbytes(quant_type: str, dtype: torch.dtype, double_quant: bool) -> None:
    for block, shape in ((64, (96, 512)), (128, (80, 384))):   # 80*384/128 = 240 scales: partial DQ block
        w = _weight(*shape, dtype, seed=block)
        packed, st = F.quantize_4bit(w, blocksize=block, quant_type=quant_type, compress_statistics=double_quant)
        ref = F.dequantize_4bit(packed, st)
        rec = quantize_weight(w.float(), CONFIGS[quant_type](block_size=block, double_quant=double_quant))
        assert torch.equal(rec.indices, _bnb_nibbles(packed, shape))
        assert torch.equal(rec.lut[0], st.code)
        if double_quant:
            dq = rec.double_quant
            assert rec.scales is None and dq.offset == float(st.offset)
            assert torch.equal(dq.codes, st.absmax) and torch.equal(dq.absmax, st.state2.absmax)
            bnb_absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
            assert torch.equal(rec.block_scales().reshape(-1), bnb_absmax)
        else:
            assert torch.equal(rec.scales.reshape(-1), st.absmax)
        assert torch.equal(rec.dequantize(dtype), ref)


def test_bits_per_weight_formula() -> None:
    w = _weight(256, 1024, torch.float32, seed=3)
    n = w.numel()
    plain = quantize_weight(w, NF4Config(block_size=64, double_quant=False))
    lut_bits = 16 * 32                                      # the fp32 code table, charged once per record
    assert bits_per_weight(plain) == pytest.approx(4 + 32 / 64 + lut_bits / n, abs=1e-12)
    dq = quantize_weight(w, NF4Config(block_size=64, double_quant=True))
    consts = lut_bits + 256 * 32 + 32                       # + dynamic map (fp32) + offset
    assert bits_per_weight(dq) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + consts / n, abs=1e-12)
    assert 4.12 < bits_per_weight(dq) < 4.17 and abs(bits_per_weight(plain) - 4.5) < 0.01


def test_quality_matches_platform_numbers() -> None:
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    for qt, want in (("nf4", 0.092), ("fp4", 0.122)):       # PLATFORM.md: bnb on random data
        rec = quantize_weight(w, CONFIGS[qt](double_quant=False))
        rel = ((rec.dequantize() - w).norm() / w.norm()).item()
        assert abs(rel - want) < 0.005, (qt, rel)


def test_bad_inputs_raise_macq_error() -> None:
    with pytest.raises(MacqError, match="--block-size 100: nf4 supports"):
        NF4Config(block_size=100)
    with pytest.raises(MacqError, match="--block-size 128 does not divide the input dim 576"):
        quantize_weight(torch.randn(4, 576), FP4Config(block_size=128))
    with pytest.raises(MacqError, match="--dq-block-size"):
        NF4Config(dq_block_size=0)

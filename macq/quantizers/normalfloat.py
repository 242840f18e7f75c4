"""NF4 / FP4: bitsandbytes' 4-bit data types (QLoRA), reproduced exactly without importing bitsandbytes.

A weight is cut into blocks of ``block_size`` consecutive elements of the *flattened* tensor, each block is
scaled by its absmax into [-1, 1] and every value snaps to the nearest of 16 fixed levels (NF4: normal
quantiles; FP4: bnb's e2m1-style table divided by its max). Because bnb blocks the flattened tensor, its
blocks coincide with blocks along the input dim only when ``in % block_size == 0``; otherwise a record
(whose scales are per ``[out, in // block]``) cannot describe bnb's result, so that case is refused.

Double quantization (bnb ``compress_statistics=True``) stores the fp32 absmaxes as 8-bit codes of bnb's
signed dynamic map, in blocks of 256, after subtracting their mean: ~0.127 instead of 0.5 bits per weight.
The arithmetic follows bnb's CPU path op for op (fp32, multiply by the reciprocal of absmax, ties to the
lower level) so that indices, absmaxes and the dequantized tensor equal bnb's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from macq.quantizers.base import QuantConfig, check
from macq.record import DoubleQuant, LUTRecord

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0)
# bnb's FP4 in bit-pattern order (sign, 2 exponent bits, 1 mantissa bit), normalised by its max (12).
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 levels (float32), index = stored 4-bit code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    data = torch.tensor([0.0 if v == 0 else v for v in FP4_RAW], dtype=torch.float32)  # bnb builds +0.0 twice
    return data / data.abs().max()


@lru_cache(maxsize=1)
def dynamic_map() -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (``create_dynamic_map()``): 7 decades of shrinking mantissa."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        n = int(2 ** (i + non_sign - max_exp) + 1)
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0)
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _nearest_sorted(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of ascending ``code``; ties go to the lower entry (bnb's rule)."""
    mids = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x.contiguous(), mids.contiguous())


@lru_cache(maxsize=1)
def _dynamic_bin_lut() -> torch.Tensor:
    """bnb's CPU 8-bit quantizer does not search the code: it cuts [-1, 1] into 65536 bins and maps each bin
    to the code nearest the bin's left edge. Near a midpoint this can pick the *farther* code, so we build
    the same table (same fp32 arithmetic) instead of searching, to get bnb's codes exactly."""
    code = dynamic_map()
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32)
    return torch.searchsorted(mids, -1.0 + (2.0 * i) / 65535.0, side="left").to(torch.uint8)


def blockwise_absmax_codes(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb ``quantize_blockwise`` (dynamic map, CPU kernel) of a 1-D fp32 tensor: ``(uint8 codes, absmax)``."""
    n = x.numel()
    nb = -(-n // block)
    xp = torch.nn.functional.pad(x, (0, nb * block - n)).view(nb, block)
    absmax = xp.abs().amax(-1)
    v = (xp * (1.0 / absmax).unsqueeze(-1)).clamp(-1, 1)
    bins = ((((v + 1.0) * 0.5) * 65535.0) + 0.5).to(torch.int32)  # truncation, as the C cast
    codes = _dynamic_bin_lut()[bins.clamp(0, 65535).long()]
    codes = torch.where((absmax == 0).unsqueeze(-1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], absmax


def double_quantize(absmax: torch.Tensor, block: int = 256) -> DoubleQuant:
    """bnb ``compress_statistics``: subtract the mean, 8-bit dynamic-map codes per block of ``block``."""
    flat = absmax.reshape(-1).float()
    offset = flat.mean()
    codes, amax2 = blockwise_absmax_codes(flat - offset, block)
    return DoubleQuant(codes=codes, code_lut=dynamic_map().clone(), absmax=amax2, offset=float(offset),
                       block_size=block)


@dataclass
class NF4Config(QuantConfig):
    method = "nf4"
    block_size: int = field(default=64, metadata={"groups": "input", "help": "absmax block along the input dim"})
    double_quant: bool = True
    dq_block_size: int = 256

    def __post_init__(self) -> None:
        check(self.block_size in BLOCK_SIZES,
              f"--block-size {self.block_size}: {self.method} supports {', '.join(map(str, BLOCK_SIZES))}")
        check(self.dq_block_size > 0, f"--dq-block-size {self.dq_block_size}: expected > 0")


@dataclass
class FP4Config(NF4Config):
    method = "fp4"


def quantize_weight(w: torch.Tensor, cfg: NF4Config) -> LUTRecord:
    """``w [out, in]`` -> LUTRecord(indices, lut [1,16], per-block absmax or its double quantization)."""
    out, inp = w.shape
    check(inp % cfg.block_size == 0, f"--block-size {cfg.block_size} does not divide the input dim {inp}")
    code = code_table(cfg.method)
    order = torch.argsort(code)              # FP4's table is in bit-pattern order, not sorted
    blocks = w.float().reshape(-1, cfg.block_size)
    absmax = blocks.abs().amax(-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1), -1, 1)
    idx = order[_nearest_sorted(scaled, code[order])].to(torch.uint8).view(out, inp)
    scales = absmax.view(out, inp // cfg.block_size)
    dq = double_quantize(scales, cfg.dq_block_size) if cfg.double_quant else None
    return LUTRecord(indices=idx, lut=code.unsqueeze(0), bits=4, scales=None if dq else scales,
                     block_size=cfg.block_size, double_quant=dq)

"""Small, dependency-free record builders for the exporter's tests and fallbacks.

They produce the same record shapes the real quantizers do (uniform affine grids via
``macq.quantizers.grid``, uniform "k-means-free" LUTs per output-channel group, NF4-style LUT + per-block
absmax) so the Core ML path can be tested without waiting for, or depending on, any quantizer.
"""

from __future__ import annotations

import torch

from macq.quantizers import grid
from macq.record import AffineRecord, LUTRecord

# bitsandbytes' NF4 code book (normal-float quantiles), float32 values as bnb stores them.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def affine_record(w: torch.Tensor, bits: int = 4, group_size: int | None = None, mode: str = "asym") -> AffineRecord:
    """``mode``: ``asym`` (integer zero), ``sym``, ``bias`` (float zero, MLX form), ``bias_int`` (bias form
    whose −b/s is an integer: the exactly exportable kind). ``group_size=None`` = per channel."""
    out, inp = w.shape
    g = group_size or inp
    wg = w.float().view(out, inp // g, g)
    if mode in ("asym", "bias_int"):
        s, z, b = grid.affine_params(wg, bits, symmetric=False)
    elif mode == "sym":
        s, z, b = grid.affine_params(wg, bits, symmetric=True)
    elif mode == "bias":
        s, z, b = grid.affine_params(wg, bits, symmetric=False, zero_point="float")
    else:
        raise ValueError(mode)
    q = grid.quantize_codes(wg, s, z, b, bits).view(out, inp)
    if mode == "bias_int":
        return AffineRecord(codes=q, scales=s, biases=-s * z, bits=bits, group_size=g)
    return AffineRecord(codes=q, scales=s, zeros=z, biases=b, bits=bits, group_size=g)


def uniform_lut_record(w: torch.Tensor, bits: int = 4, rows_per_group: int | None = None) -> LUTRecord:
    """Evenly spaced LUT between each output-channel group's min and max; nearest-entry indices."""
    out, inp = w.shape
    groups = 1 if rows_per_group is None else out // rows_per_group
    wg = w.float().reshape(groups, -1)
    lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    lut = lo + (hi - lo) * torch.linspace(0, 1, 2 ** bits)
    idx = (wg.unsqueeze(-1) - lut.unsqueeze(1)).abs().argmin(-1).view(out, inp).to(torch.uint8)
    return LUTRecord(indices=idx, lut=lut, bits=bits)


def nf4_record(w: torch.Tensor, block_size: int = 64, fp16_values: bool = True) -> LUTRecord:
    """NF4: absmax per block of the input dim, nearest NF4 code. ``fp16_values`` rounds the code book and
    the scales to fp16 first (then Core ML's LUT + block-scale chain is exact)."""
    out, inp = w.shape
    lut = NF4.half().float() if fp16_values else NF4.clone()
    wb = w.float().view(out, inp // block_size, block_size)
    absmax = wb.abs().amax(-1).clamp_min(1e-8)
    if fp16_values:
        absmax = absmax.half().float()
    idx = ((wb / absmax.unsqueeze(-1)).unsqueeze(-1) - lut).abs().argmin(-1).view(out, inp).to(torch.uint8)
    return LUTRecord(indices=idx, lut=lut.view(1, 16), bits=4, scales=absmax, block_size=block_size)

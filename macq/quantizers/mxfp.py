"""Round-to-nearest onto the microscaled float grids (mxfp4, nvfp4, mxfp8), bit for bit as ``mx.quantize``.

MLX 0.32.4's algorithm (``mx.quantize``'s CPU path; restated from its observed behaviour, checked bit for bit by
the tests, not copied) per block of ``g``:

1. ``s = absmax / M`` with ``M`` the largest element (6 for E2M1, 448 for E4M3), computed in the weight dtype;
2. mx modes: ``e = ceil(log2(s))`` exactly (0 when ``s == 0``), the stored byte ``(e + 127) mod 256`` and
   ``x = w / 2**e``; nvfp4: ``s`` rounded to E4M3 (saturating) and ``x = w / decode(s)``, which is ``±inf`` /
   NaN when the scale rounds to 0 (a block with ``absmax < 6·2**-10``: MLX's nvfp4 has no tensor scale);
3. E2M1 codes: the *first* table entry nearest to ``x`` (table order ``0, .5, .., 6, -0, -.5, .., -6``), so a
   tie goes to the smaller magnitude and ``x`` in ``[-0.25, 0)`` to +0; NaN / inf land on code 0;
   E4M3 codes: ``x`` rounded to E4M3, saturating at ±448.

Rounding the scale *up* to ``2**e`` means nothing clips (``|x| <= M``), at the price of up to half the grid's top
binade unused (OCP's reference floors and clips instead; MLX's earlier releases rounded to nearest). Every
arithmetic step is emulated in the dtype MLX runs it in (the weight dtype; float32 for nvfp4's distances,
promoted there by its float32 unit tensor scale): an exact float64 operation rounded once to that dtype is
the correctly rounded result MLX's per-element float arithmetic gives.
"""

from __future__ import annotations

import torch

from macq.errors import MacqError
from macq.microscale import E2M1_VALUES, FPFormat, decode_scales, encode_e4m3, fp_format


def _r(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 result once to ``dtype`` and back to float64 (one MLX op in ``dtype``)."""
    return x.to(dtype).double()


def e2m1_codes(x: torch.Tensor, dist_dtype: torch.dtype) -> torch.Tensor:
    """MLX's E2M1 rounding: argmin over ``|x - table|`` computed in ``dist_dtype``, first index on ties,
    NaN distances never chosen (all-NaN / all-inf rows give code 0)."""
    table = _r(torch.tensor(E2M1_VALUES, dtype=torch.float64), dist_dtype)
    d = _r((x.unsqueeze(-1) - table).abs(), dist_dtype)
    d = torch.nan_to_num(d, nan=float("inf"))
    return d.argmin(-1).to(torch.uint8)


def block_scales(wg: torch.Tensor, fmt: FPFormat, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale bytes, divisor)`` per block of ``wg [..., g]`` (float64 holding ``dtype`` values), MLX's way."""
    s = _r(wg.abs().amax(-1, keepdim=True) / fmt.max_element, dtype)
    if fmt.scale == "e4m3":
        byte = encode_e4m3(s.float())
        return byte, decode_scales(byte, "e4m3").double()
    e = torch.where(s == 0, torch.zeros_like(s), torch.ceil(torch.log2(s)))
    byte = ((e.to(torch.int64) + 127) % 256).to(torch.uint8)
    return byte, _r(torch.pow(2.0, e), dtype)


def codes_for(x: torch.Tensor, fmt: FPFormat, dist_dtype: torch.dtype) -> torch.Tensor:
    """Element codes of ``x`` (already divided by the block scale) on the format's grid."""
    if fmt.element == "e2m1":
        return e2m1_codes(x, dist_dtype)
    return encode_e4m3(x.float())


def mlx_fp_quantize(w: torch.Tensor, mode: str, dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> ``(codes uint8 [out, in], scale bytes uint8 [out, in // g])`` equal to
    ``mx.quantize(w.astype(dtype), mode=mode)`` (codes unpacked)."""
    fmt = fp_format(mode)
    out, inp = w.shape
    if inp % fmt.group_size:
        raise MacqError(f"--mode {mode}: its block of {fmt.group_size} does not divide the input dim {inp}")
    wg = w.detach().to(dtype).double().reshape(out, inp // fmt.group_size, fmt.group_size)
    byte, div = block_scales(wg, fmt, dtype)
    x = _r(wg / div, dtype)
    dist = torch.float32 if fmt.scale == "e4m3" else dtype
    codes = codes_for(x, fmt, dist)
    return codes.reshape(out, inp), byte.reshape(out, inp // fmt.group_size)

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

from collections.abc import Callable

import torch

from macq.device import has_float64
from macq.errors import MacqError
from macq.microscale import E2M1_VALUES, FPFormat, decode_scales, encode_e4m3, fp_format


def _r(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float64 result once to ``dtype`` and back to float64 (one MLX op in ``dtype``)."""
    return x.to(dtype).double()


def e2m1_codes(x: torch.Tensor, dist_dtype: torch.dtype) -> torch.Tensor:
    """MLX's E2M1 rounding: argmin over ``|x - table|`` computed in ``dist_dtype``, first index on ties,
    NaN distances never chosen (all-NaN / all-inf rows give code 0)."""
    table = _r(torch.tensor(E2M1_VALUES, dtype=torch.float64, device=x.device), dist_dtype)
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


ROW_CHUNK_ELEMENTS = 1 << 20   # weights per chunk: the float64 [.., 16] distance tensor stays ~130 MB


def _by_rows(w: torch.Tensor, mode: str, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``fn(rows [r, in]) -> (codes, bytes)`` to row chunks (rows are independent), bounding memory on
    big tensors (a 49152 x 576 embedding would otherwise need GBs of float64 temporaries). MLX's rounding is
    reproduced in float64: on a device without it the rows go through the CPU."""
    fmt = fp_format(mode)
    out, inp = w.shape
    if inp % fmt.group_size:
        raise MacqError(f"--mode {mode}: its block of {fmt.group_size} does not divide the input dim {inp}")
    step = max(1, ROW_CHUNK_ELEMENTS // inp)
    src = w.detach() if has_float64(w.device) else w.detach().cpu()
    parts = [fn(src[r:r + step], fmt) for r in range(0, out, step)]
    return torch.cat([c for c, _ in parts]).to(w.device), torch.cat([b for _, b in parts]).to(w.device)


def mlx_fp_quantize(w: torch.Tensor, mode: str, dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> ``(codes uint8 [out, in], scale bytes uint8 [out, in // g])`` equal to
    ``mx.quantize(w.astype(dtype), mode=mode)`` (codes unpacked)."""

    def rows(w: torch.Tensor, fmt: FPFormat) -> tuple[torch.Tensor, torch.Tensor]:
        out, inp = w.shape
        wg = w.to(dtype).double().reshape(out, inp // fmt.group_size, fmt.group_size)
        byte, div = block_scales(wg, fmt, dtype)
        x = _r(wg / div, dtype)
        dist = torch.float32 if fmt.scale == "e4m3" else dtype
        return codes_for(x, fmt, dist).reshape(out, inp), byte.reshape(out, inp // fmt.group_size)

    return _by_rows(w, mode, rows)


# ------------------------------------------------------------------------------------------ calibrated use
E4M3_STEPS = range(-8, 4)   # nvfp4 scale candidates: the E4M3 codes 8 below to 3 above MLX's (codes are monotone)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)   # between consecutive E2M1 magnitudes
MSE_POWER = 2.4                                    # |w - q|^2.4, GPTQ's own scale-search norm


def nearest_codes(x: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """Nearest element code of ``x`` (already divided by its scale); saturates at the grid's ends."""
    if fmt.element == "e4m3":
        return encode_e4m3(x.float())
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=x.dtype, device=x.device)
    mag = torch.bucketize(torch.nan_to_num(x.abs(), nan=0.0), mids)        # 0..7: index of the nearest magnitude
    return torch.where((x < 0) & (mag > 0), mag + 8, mag).to(torch.uint8)


def grid_values(codes: torch.Tensor, fmt: FPFormat, divisor: torch.Tensor) -> torch.Tensor:
    from macq.microscale import decode_elements

    return decode_elements(codes.cpu(), fmt.element).to(divisor.device, divisor.dtype) * divisor


def round_on(wg: torch.Tensor, div: torch.Tensor, fmt: FPFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)`` of ``wg [..., g]`` rounded to the nearest point of the grids ``div [..., 1]`` (decoded
    scales); a zero divisor (an all-zero block) gives code 0 and value 0."""
    safe = torch.where(div > 0, div, torch.ones_like(div))
    codes = nearest_codes(wg / safe, fmt)
    return codes, torch.where(div > 0, grid_values(codes, fmt, safe), torch.zeros_like(wg))


def _candidates(wg: torch.Tensor, fmt: FPFormat, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MLX's own scale first, then alternatives: for E8M0 the next power of two down (clips the block's top,
    halves the step); for E4M3 the neighbouring scale codes (:data:`E4M3_STEPS`: about 0.5x to 1.3x in the normal
    range, steps of 2**-9 among subnormals)."""
    first = block_scales(wg, fmt, dtype)
    out = [first]
    if fmt.scale == "e8m0":
        byte = first[0]
        down = torch.where(byte > 0, byte - 1, byte)
        out.append((down, decode_scales(down, "e8m0").to(wg.dtype)))
        return out
    base = first[0].to(torch.int16)
    for d in E4M3_STEPS:
        if d == 0:
            continue
        byte = (base + d).clamp(1, 0x7E).to(torch.uint8)
        out.append((byte, decode_scales(byte, "e4m3").to(wg.dtype)))
    return out


def weight_error(wg: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The data-free block error ``Σ|w − q|^2.4`` per block ``[..., 1]`` (GPTQ's scale-search norm)."""
    return (wg - q).abs().pow(MSE_POWER).sum(-1, keepdim=True)


BlockError = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def search_scales(wg: torch.Tensor, fmt: FPFormat, dtype: torch.dtype, error: BlockError = weight_error
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of ``wg [..., g]`` (float64), the scale byte whose grid has the least ``error(w, q)``
    (``[..., 1]`` per block; default :func:`weight_error`; AWQ passes the block's output error under its
    input Gram matrix), MLX's own scale tried first and kept on ties (never worse than RTN per block on that
    error). A zero scale is never chosen for a block with any nonzero weight (its codes would be meaningless)."""
    best_b, best_d, best_e = None, None, None
    nz = wg.abs().amax(-1, keepdim=True) > 0
    cands = _candidates(wg, fmt, dtype)
    wg = wg.float()            # choosing only: float32 errors rank the candidates (the values are exact in it)
    for byte, div in cands:
        div = div.float()
        ok = (div > 0) | ~nz
        safe = torch.where(div > 0, div, torch.ones_like(div))
        q = grid_values(nearest_codes(wg / safe, fmt), fmt, safe)
        err = error(wg, q.float())
        err = torch.where(ok, err, torch.full_like(err, float("inf")))
        if best_b is None:
            best_b, best_d, best_e = byte, div, err
            continue
        better = err < best_e
        best_b, best_d = torch.where(better, byte, best_b), torch.where(better, div, best_d)
        best_e = torch.where(better, err, best_e)
    return best_b, best_d.double()


def mse_fp_quantize(w: torch.Tensor, mode: str, dtype: torch.dtype = torch.float16
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free improvement on :func:`mlx_fp_quantize`: each block's scale byte by :func:`search_scales`,
    codes nearest on that grid. Same record layout; the bytes are no longer ``mx.quantize``'s."""

    def rows(w: torch.Tensor, fmt: FPFormat) -> tuple[torch.Tensor, torch.Tensor]:
        out, inp = w.shape
        wg = w.to(dtype).double().reshape(out, inp // fmt.group_size, fmt.group_size)
        byte, div = search_scales(wg, fmt, dtype)
        safe = torch.where(div > 0, div, torch.ones_like(div))
        return nearest_codes(wg / safe, fmt).reshape(out, inp), byte.reshape(out, inp // fmt.group_size)

    return _by_rows(w, mode, rows)

"""Microscaled float formats as data: MX (OCP) and NV fp4 / fp8 element codes with one 8-bit scale per block.

Three formats, each ``w = element(code) * scale(byte)`` per block of ``group_size`` input elements:

* ``mxfp4``: E2M1 codes (4 bits), an E8M0 scale (``2**(byte - 127)``) per 32;
* ``nvfp4``: E2M1 codes, an fp8 E4M3 scale per 16 (MLX applies no second-level tensor scale unless asked);
* ``mxfp8``: E4M3 codes (8 bits), an E8M0 scale per 32.

Codes follow the OCP bit layouts: E2M1 code ``c`` is sign bit 3 and magnitude ``(0, .5, 1, 1.5, 2, 3, 4, 6)[c & 7]``;
E4M3 ("fn": no infinities, ``0x7F``/``0xFF`` are NaN) is sign, 4 exponent bits (bias 7) and 3 mantissa bits.
Decoding is exact in float32 (every value is a short binary fraction), so a record's dequantized weight is the
format's real value, independent of the runtime dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from macq.errors import MacqError

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E4M3_MAX = 448.0
E2M1_MAX = 6.0
E8M0_NAN = 255
E4M3_NAN = (0x7F, 0xFF)


@dataclass(frozen=True)
class FPFormat:
    """One microscaled format: element encoding, its code width, the block along the input dim, the scale
    encoding, and the largest element magnitude (what a block's absmax is mapped onto)."""

    name: str
    element: str      # "e2m1" | "e4m3"
    bits: int
    group_size: int
    scale: str        # "e8m0" | "e4m3"

    @property
    def max_element(self) -> float:
        return E2M1_MAX if self.element == "e2m1" else E4M3_MAX


FP_FORMATS: dict[str, FPFormat] = {f.name: f for f in (
    FPFormat("mxfp4", "e2m1", 4, 32, "e8m0"),
    FPFormat("nvfp4", "e2m1", 4, 16, "e4m3"),
    FPFormat("mxfp8", "e4m3", 8, 32, "e8m0"),
)}


def fp_format(mode: str) -> FPFormat:
    try:
        return FP_FORMATS[mode]
    except KeyError:
        raise MacqError(f"mode {mode!r}: expected one of {', '.join(FP_FORMATS)}") from None


def _e4m3_table() -> torch.Tensor:
    b = torch.arange(256)
    sign = torch.where(b >= 128, -1.0, 1.0).double()
    e, m = (b >> 3) & 0xF, (b & 7).double()
    mag = torch.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * torch.pow(2.0, (e - 7).double()))
    v = sign * mag
    v[0x7F] = v[0xFF] = float("nan")
    return v.float()


E4M3_TABLE = _e4m3_table()
E8M0_TABLE = torch.pow(2.0, torch.arange(256, dtype=torch.float64) - 127).float()   # one table: exact on every device
E2M1_TABLE = torch.tensor(E2M1_VALUES, dtype=torch.float32)


def decode_elements(codes: torch.Tensor, element: str) -> torch.Tensor:
    """Element codes -> float32 values (exact)."""
    table = E2M1_TABLE if element == "e2m1" else E4M3_TABLE
    return table.to(codes.device)[codes.long()]


def decode_scales(scales: torch.Tensor, scale: str) -> torch.Tensor:
    """Scale bytes -> float32 values (exact; E8M0 2**-127 is a float32 subnormal)."""
    if scale == "e4m3":
        return E4M3_TABLE.to(scales.device)[scales.long()]
    return E8M0_TABLE.to(scales.device)[scales.long()]


def encode_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float -> E4M3 byte, round-to-nearest-even, *saturating*: ``|x| >= 448``, inf and NaN become ``±448``
    (``0x7E`` with x's sign bit), as MLX's ``to_fp8`` does (IEEE conversion would give NaN)."""
    f = x.float()
    neg = torch.signbit(f)
    mag = f.abs()
    sat = ~(mag < E4M3_MAX)            # NaN compares false: saturates too
    q = torch.where(sat, torch.zeros_like(mag), mag).to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.where(sat, torch.full_like(q, 0x7E), q)
    return q | (neg.to(torch.uint8) << 7)


def check_fp_record_bytes(codes: torch.Tensor, scales: torch.Tensor, fmt: FPFormat) -> None:
    """Refuse byte patterns that decode to NaN (E4M3 ``0x7F``/``0xFF``, E8M0 ``0xFF``): a NaN weight would
    silently poison every output that reads it."""
    if fmt.element == "e4m3" and codes.numel() and bool(((codes == 0x7F) | (codes == 0xFF)).any()):
        raise MacqError(f"record codes: {fmt.name} codes hold the E4M3 NaN pattern 0x7F/0xFF")
    bad = ((scales == 0x7F) | (scales == 0xFF)) if fmt.scale == "e4m3" else (scales == E8M0_NAN)
    if scales.numel() and bool(bad.any()):
        raise MacqError(f"record scales: {fmt.name} scales hold the {fmt.scale.upper()} NaN pattern")

"""Candidate weight formats per target runtime, as data, with their exact storage cost.

A :class:`Format` is what the mixed-precision allocator chooses per layer. Its cost on an ``[out, in]``
weight follows the record storage rule of :mod:`macq.record` exactly (codes at ``bits``; fp16 scales per
group; integer zero-points at the code width, or fp16 biases for MLX's ``w = s·q + b`` form; fp16 LUT rows
per group of output channels), so the allocator's budget and ``QuantizedModel.bits_per_weight()`` agree to
the bit. A format a layer cannot hold (group not dividing the dim) costs ``inf``: never chosen.

Runtimes differ in what they can execute, so each target lists only formats its exporter can write:

* ``mlx``: ``mx.quantize`` affine bits {2,3,4,5,6,8} x group {32,64,128}, scale *and bias* in fp16, and its
  microscaled float modes (``mxfp4``, ``nvfp4``, ``mxfp8``: float codes with one scale byte per block), which
  mlx_lm loads per layer next to affine ones;
* ``coreml``: ``constexpr_blockwise_shift_scale`` int4/int8 per block {32,64,128} (symmetric or with an
  integer zero-point), and ``constexpr_lut_to_dense`` palettes of {2,3,4,6,8} bits per 16 output channels;
* ``any``: the union.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from macq.errors import MacqError
from macq.microscale import FP_FORMATS, fp_format
from macq.record import AffineRecord, Record

FP16_BITS = 16
_NAME = re.compile(r"^(?:a(\d)g(\d+)([bzs])|lut(\d)c(\d+))$")


@dataclass(frozen=True)
class Format:
    """One way to store a weight. ``group_size``: input elements per scale (affine, fp) or output channels per
    LUT (lut). ``zero``: ``"bias"`` (fp16 ``b``, MLX), ``"int"`` (code-width zero-point) or ``"none"``
    (symmetric, and every float mode). ``mode``: the MLX float mode of an ``fp`` format (its bits and block
    follow from it: :func:`fp_format`)."""

    kind: str
    bits: int
    group_size: int
    zero: str = "bias"
    mode: str = ""

    @classmethod
    def float_mode(cls, mode: str) -> "Format":
        fmt = fp_format(mode)
        return cls("fp", fmt.bits, fmt.group_size, "none", mode)

    def __post_init__(self) -> None:
        if self.kind not in ("affine", "lut", "fp"):
            raise MacqError(f"format kind {self.kind!r}: expected affine, lut or fp")
        if self.kind == "fp" and (self.mode not in FP_FORMATS or (self.bits, self.group_size, self.zero) !=
                                  (fp_format(self.mode).bits, fp_format(self.mode).group_size, "none")):
            raise MacqError(f"format fp mode={self.mode!r}: expected one of {', '.join(FP_FORMATS)}")
        if not 1 <= self.bits <= 8 or self.group_size < 1:
            raise MacqError(f"format {self.kind} bits={self.bits} group={self.group_size}: out of range")
        if self.kind == "affine" and self.zero not in ("bias", "int", "none"):
            raise MacqError(f"format zero={self.zero!r}: expected bias, int or none")

    @property
    def symmetric(self) -> bool:
        return self.kind == "affine" and self.zero == "none"

    @property
    def name(self) -> str:
        if self.kind == "fp":
            return self.mode
        if self.kind == "lut":
            return f"lut{self.bits}c{self.group_size}"
        return f"a{self.bits}g{self.group_size}{ {'bias': 'b', 'int': 'z', 'none': 's'}[self.zero] }"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> "Format":
        """``a4g64b`` (affine, bias form), ``a4g64z`` (int zero-point), ``a4g64s`` (symmetric), ``lut4c16``,
        ``mxfp4`` / ``nvfp4`` / ``mxfp8``."""
        if name.strip() in FP_FORMATS:
            return cls.float_mode(name.strip())
        m = _NAME.match(name.strip())
        if not m:
            raise MacqError(f"format {name!r}: expected a<bits>g<group><b|z|s> (e.g. a4g64b), lut<bits>c<channels> "
                            f"or a float mode ({', '.join(FP_FORMATS)})")
        if m.group(1):
            return cls("affine", int(m.group(1)), int(m.group(2)), {"b": "bias", "z": "int", "s": "none"}[m.group(3)])
        return cls("lut", int(m.group(4)), int(m.group(5)))

    def fits(self, shape: tuple[int, int]) -> bool:
        out, inp = shape
        return (out if self.kind == "lut" else inp) % self.group_size == 0

    def storage_bits(self, shape: tuple[int, int]) -> int | None:
        """Exact stored bits of an ``[out, in]`` weight in this format (``None`` if it does not fit)."""
        if not self.fits(shape):
            return None
        out, inp = shape
        codes = out * inp * self.bits
        if self.kind == "lut":
            return codes + (out // self.group_size) * 2 ** self.bits * FP16_BITS
        groups = out * (inp // self.group_size)
        if self.kind == "fp":
            return codes + groups * 8              # one scale byte (E8M0 or E4M3) per block
        extra = {"bias": FP16_BITS, "int": self.bits, "none": 0}[self.zero]
        return codes + groups * (FP16_BITS + extra)

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        bits = self.storage_bits(shape)
        return float("inf") if bits is None else bits / (shape[0] * shape[1])

    def quantize(self, w: torch.Tensor) -> Record:
        """Round-to-nearest (affine, fp: ``mx.quantize``'s own) or k-means (lut) record of ``w [out, in]``."""
        if not self.fits(tuple(w.shape)):
            raise MacqError(f"format {self.name} does not fit a weight of shape {tuple(w.shape)}")
        if self.kind == "lut":
            from macq.quantizers.palettize import KMeansConfig
            from macq.quantizers.palettize import quantize_weight as palettize

            return palettize(w.float(), KMeansConfig(bits=self.bits, group_size=self.group_size))
        from macq.quantizers.rtn import RTNConfig
        from macq.quantizers.rtn import quantize_weight as rtn

        if self.kind == "fp":
            return rtn(w.float(), RTNConfig(mode=self.mode))
        return rtn(w.float(), RTNConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                                        zero_point="float" if self.zero == "bias" else "int"))


def to_bias_form(rec: AffineRecord) -> AffineRecord:
    """Re-express a zero-point record as MLX's ``w = s·q + b`` (fp16 ``b = −s·z``): what an MLX export
    stores, so it is what a bias-form format is charged for (GPTQ produces zero-points)."""
    if rec.biases is not None:
        return rec
    biases = rec.effective_biases().to(rec.scales.dtype)
    return AffineRecord(codes=rec.codes, scales=rec.scales, bits=rec.bits, group_size=rec.group_size,
                        biases=biases, per_tensor=rec.per_tensor, transposed=rec.transposed)


_MLX = (tuple(Format("affine", b, g, "bias") for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))
        + tuple(Format.float_mode(m) for m in FP_FORMATS))
_COREML = (tuple(Format("affine", b, g, z) for b in (4, 8) for g in (32, 64, 128) for z in ("none", "int"))
           + tuple(Format("lut", b, 16) for b in (2, 3, 4, 6, 8)))
TARGET_FORMATS: dict[str, tuple[Format, ...]] = {
    "mlx": _MLX,
    "coreml": _COREML,
    "any": _MLX + _COREML,
}


def candidate_formats(target: str, names: tuple[str, ...] | list[str] = ()) -> list[Format]:
    """The target's formats, or the named subset (each must be one the target supports)."""
    if target not in TARGET_FORMATS:
        raise MacqError(f"--target {target!r}: expected one of {', '.join(TARGET_FORMATS)}")
    allowed = TARGET_FORMATS[target]
    if not names:
        return list(allowed)
    out = []
    for n in names:
        f = n if isinstance(n, Format) else Format.parse(n)
        if f not in allowed:
            raise MacqError(f"format {f.name} is not supported by target {target!r}")
        if f not in out:
            out.append(f)
    return out

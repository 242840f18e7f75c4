"""Uniform integer grids shared by RTN, GPTQ and AWQ: parameters from a group's range, codes, dequant.

All functions work on groups in the last dim (``[..., g]``) and return per-group parameters ``[...]``,
vectorised over every group at once. Scales are rounded to the storage dtype *before* codes are
computed, so a record's dequantized weight is exactly what an exporter will reproduce from it.

Conventions (the ones GPTQ, llm-compressor and MLX use, so comparisons are like for like):

* symmetric: ``s = 2·absmax / (2^b − 1)``, implicit zero ``2^(b−1)``, codes ``[0, 2^b)``
  (all ``2^b`` levels used, i.e. signed ``[−2^(b−1), 2^(b−1) − 1]``);
* asymmetric, integer zero-point: the range is widened to include 0, ``s = (max − min)/(2^b − 1)``,
  ``z = round(−min/s)`` clamped to the code range;
* asymmetric, float zero (``zero_point="float"``, MLX's affine form): ``w = s·q + b`` with ``b = min``.
"""

from __future__ import annotations

import torch

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ScaleOptions:
    """What affine configs (``scale_dtype``, ``group_size`` fields) derive from those fields, in one place."""

    scale_dtype: str
    group_size: int

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def group_for(self, name: str, inp: int) -> int:
        """The group size for module ``name`` with ``inp`` inputs (0 = per channel); refuses one that does not divide."""
        from macq.quantizers.base import check

        g = inp if self.group_size == 0 else self.group_size
        check(inp % g == 0, f"--group-size {self.group_size} does not divide {name}'s input dim {inp}")
        return g

_TINY = 2.0 ** -24  # smallest positive fp16 subnormal: scales never collapse to zero


def _round_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    s = s.clamp_min(_TINY).to(dtype)
    return torch.where(s.float() > 0, s, torch.full_like(s, _TINY)).float()


def affine_params(w: torch.Tensor, bits: int, symmetric: bool, zero_point: str = "int",
                  scale_dtype: torch.dtype = torch.float16, clip: torch.Tensor | float = 1.0,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(scale, zero, bias)`` per group of ``w [..., g]``; exactly one of zero/bias is set unless symmetric.

    ``clip`` (scalar or ``[...]``) shrinks the group's range, for MSE / AWQ clipping searches.
    Returned tensors are float32 holding values representable in ``scale_dtype``.
    """
    clip_t = torch.as_tensor(clip, dtype=torch.float32, device=w.device)
    return params_from_range(w.amin(-1).float() * clip_t, w.amax(-1).float() * clip_t, bits, symmetric, zero_point,
                             scale_dtype)


def params_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool, zero_point: str = "int",
                      scale_dtype: torch.dtype = torch.float16
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`affine_params` from each group's (clipped) float32 ``min`` / ``max``: searches over clip factors
    compute the range once and scale it per candidate."""
    maxq = 2 ** bits - 1
    if symmetric:
        absmax = torch.maximum(wmin.abs(), wmax.abs())
        return _round_scale(2 * absmax / maxq, scale_dtype), None, None
    if zero_point == "float":
        scale = _round_scale((wmax - wmin) / maxq, scale_dtype)
        bias = wmin.to(scale_dtype).float()
        return scale, None, bias
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    scale = _round_scale((wmax - wmin) / maxq, scale_dtype)
    zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero, None


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None,
                   bits: int) -> torch.Tensor:
    """Nearest codes on the grid for ``w [..., g]`` (uint8, clamped to ``[0, 2^b)``)."""
    maxq = 2 ** bits - 1
    s = scale.unsqueeze(-1)
    if bias is not None:
        q = torch.round((w.float() - bias.unsqueeze(-1)) / s)
    else:
        z = zero.unsqueeze(-1) if zero is not None else torch.tensor(float(2 ** (bits - 1)))
        q = torch.round(w.float() / s) + z
    return q.clamp(0, maxq).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    s = scale.unsqueeze(-1)
    if bias is not None:
        return s * codes.float() + bias.unsqueeze(-1)
    z = zero.unsqueeze(-1) if zero is not None else torch.tensor(float(2 ** (bits - 1)))
    return s * (codes.float() - z)


def codes_into(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               out: torch.Tensor) -> torch.Tensor:
    """:func:`quantize_codes`'s codes of a float32 ``w`` as floats, written into ``out``: the same arithmetic
    (``clamp(round(w / s) + z)``), in place. ``scale`` / ``zero`` broadcast against ``w`` as given (no
    unsqueeze); ``zero=None`` is the symmetric grid. For searches that round many candidates: no allocation."""
    z = zero if zero is not None else 2 ** (bits - 1)
    return torch.div(w, scale, out=out).round_().add_(z).clamp_(0, 2 ** bits - 1)


def dequantize_into(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                    out: torch.Tensor) -> torch.Tensor:
    """:func:`dequantize_codes` of float ``codes`` into ``out`` (which may be ``codes`` itself): ``s·(q − z)``."""
    z = zero if zero is not None else 2 ** (bits - 1)
    return torch.sub(codes, z, out=out).mul_(scale)


def fake_quantize(w: torch.Tensor, bits: int, symmetric: bool, zero_point: str = "int",
                  scale_dtype: torch.dtype = torch.float16, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Round ``w [..., g]`` to its own group grid and return the dequantized values (same shape)."""
    scale, zero, bias = affine_params(w, bits, symmetric, zero_point, scale_dtype, clip)
    return dequantize_codes(quantize_codes(w, scale, zero, bias, bits), scale, zero, bias, bits)

"""Round-to-nearest (RTN) onto a uniform grid per group of input elements: the calibration-free baseline.

Three affine grid forms, stored as an :class:`~macq.record.AffineRecord`, and MLX's microscaled float modes:

* ``symmetric=True``: ``w = s·(q − 2^(b−1))``, grid maths from :mod:`macq.quantizers.grid`;
* ``symmetric=False, zero_point="int"``: integer zero-point (GPTQ / Core ML form), also from ``grid``;
* ``symmetric=False, zero_point="float"``: MLX's affine bias form ``w = s·q + b``, computed with MLX's own
  algorithm (:func:`mlx_affine_params`) so that an RTN MLX export is bit-identical to ``mlx_lm.convert -q``.

* ``mode="mxfp4" | "nvfp4" | "mxfp8"``: E2M1 / E4M3 codes with an 8-bit scale per block, stored as an
  :class:`~macq.record.FPRecord`, computed bit for bit as ``mx.quantize`` (:mod:`macq.quantizers.mxfp`).

MLX's algorithm is not grid's "bias = min" float mode: it anchors the grid at the group extreme of larger
magnitude (``edge``), makes the scale negative when that extreme is the max, and then snaps the scale so
that 0 falls exactly on a grid point (``scale = edge / rint(edge / scale)``). Codes are computed with the
*unrounded* fp32 scale/bias and only the stored scale/bias are rounded to the weight dtype — again as MLX
does, because bit-identity with ``mx.quantize`` is the point of this mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from macq.microscale import FP_FORMATS, fp_format
from macq.quantizers.base import QuantConfig, check, check_bits
from macq.quantizers.grid import SCALE_DTYPES, ScaleOptions, affine_params, dequantize_codes, quantize_codes
from macq.record import AffineRecord, FPRecord

RTN_BITS = (2, 3, 4, 5, 6, 8)
MODES = ("affine", *FP_FORMATS)
_DEFAULT_BITS, _DEFAULT_GROUP = 4, 128
MSE_CLIP_GRID = torch.linspace(1.0, 0.5, 51)  # shrink factors tried per group (1.0 first: never worse)
_MLX_EPS = 1e-7


@dataclass
class RTNConfig(ScaleOptions, QuantConfig):
    method = "rtn"
    bits: int = 4
    group_size: int = field(default=128, metadata={
        "groups": "input", "help": "input elements per group (unset: largest of 128/64/32 dividing the model's dims); "
                                             "0 per channel, -1 per tensor"})
    symmetric: bool = True
    zero_point: str = "int"        # "int" | "float" (MLX's affine bias form, MLX's exact algorithm)
    mse_clip: bool = False
    scale_dtype: str = field(default="float16", metadata={
        "help": "dtype of the stored scales / biases; in the float modes, the dtype MLX runs mx.quantize in "
                "(the export's model dtype)"})
    mode: str = field(default="affine", metadata={
        "help": "affine (integer grid) or an MLX microscaled float mode: mxfp4 (E2M1 codes, power-of-two scale "
                "per 32), nvfp4 (E2M1, fp8 E4M3 scale per 16), mxfp8 (E4M3 codes, power-of-two scale per 32); a "
                "float mode fixes --bits and --group-size (leave them unset)"})
    recipe: str | None = field(default=None, metadata={
        "help": "mlx_lm's mixed predicate (mixed_2_6, mixed_3_4, mixed_3_6, mixed_4_6): low bits everywhere, high bits "
                "on v_proj/down_proj where llama.cpp's use_more_bits holds and on lm_head, as mlx_lm.convert's "
                "quant predicate does (replaces --bits; --override still wins)"})

    def __post_init__(self) -> None:
        check(self.mode in MODES, f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode != "affine":
            fix_float_mode(self)
        if self.recipe is not None:
            from macq.quantizers.mlx_recipes import mlx_lm_recipe

            mlx_lm_recipe(self.recipe)
            check(self.mode == "affine", f"--recipe {self.recipe}: mlx_lm's predicates are affine only, not "
                  f"--mode {self.mode}")
        check_bits(self.bits, RTN_BITS, "rtn")
        check(self.group_size >= -1, f"--group-size {self.group_size}: expected >0, 0 (per channel) or -1 (per tensor)")
        check(self.zero_point in ("int", "float"), f"--zero-point {self.zero_point}: expected int or float")
        check(self.scale_dtype in SCALE_DTYPES,
              f"--scale-dtype {self.scale_dtype}: expected one of {', '.join(SCALE_DTYPES)}")

    def bind_layers(self, index) -> "RTNConfig":
        """This config with the model's layer numbering (:class:`~macq.quantizers.recipes.LayerIndex`), which a
        ``recipe`` needs to pick each module's bits; the binding is not a field (it is the model's, not the
        method's) and lives until :meth:`for_module` resolves a module."""
        bound = replace(self)
        bound._layers = index
        return bound

    def for_module(self, name: str) -> "RTNConfig":
        """Overrides first (the first matching ``--override`` wins), else the recipe's bits for ``name``.
        An unbound recipe config resolves overrides only: group sizes, all a pre-check reads, do not depend on it."""
        cfg = super().for_module(name)
        index = getattr(self, "_layers", None)
        if self.recipe is None or index is None or cfg is not self:
            return cfg
        from macq.quantizers.mlx_recipes import mlx_lm_recipe_bits

        return replace(self, overrides=(), recipe=None, bits=mlx_lm_recipe_bits(self.recipe, name, index))



def fix_float_mode(cfg) -> None:
    """A float mode has one code width and one block: unset (default) --bits / --group-size take them, a
    different explicit value is refused rather than ignored (shared by every config with a ``mode``)."""
    fmt = fp_format(cfg.mode)
    for name, have, default, want in (("bits", cfg.bits, _DEFAULT_BITS, fmt.bits),
                                      ("group-size", cfg.group_size, _DEFAULT_GROUP, fmt.group_size)):
        check(have in (default, want), f"--{name} {have}: --mode {cfg.mode} stores {fmt.bits}-bit codes with "
              f"one scale per {fmt.group_size} (leave --{name} unset)")
    cfg.bits, cfg.group_size = fmt.bits, fmt.group_size


def mlx_affine_params(wg: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """MLX's affine ``(scale, bias)`` per group of ``wg [..., g]``, unrounded float32 (see module doc)."""
    n_bins = float(2 ** bits - 1)
    clip_t = torch.as_tensor(clip, dtype=torch.float32)
    w_min, w_max = torch.aminmax(wg, dim=-1)  # one pass over the weights (big models are memory-bound)
    w_min, w_max = w_min.float() * clip_t, w_max.float() * clip_t
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / n_bins, min=_MLX_EPS)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)  # round-half-even, like std::rint
    nz = q0 != 0
    scale = torch.where(nz, edge / torch.where(nz, q0, torch.ones_like(q0)), scale)
    bias = torch.where(nz, edge, torch.zeros_like(edge))
    return scale, bias


def _mlx_quantize(wg: torch.Tensor, bits: int, sdtype: torch.dtype, clip: torch.Tensor | float = 1.0):
    scale, bias = mlx_affine_params(wg, bits, clip)
    q = wg.float() - bias.unsqueeze(-1)           # the same ops as round((w - b) / s), in place after the first
    q.div_(scale.unsqueeze(-1)).round_().clamp_(0, 2 ** bits - 1)
    return q.to(torch.uint8), scale.to(sdtype).float(), None, bias.to(sdtype).float()


def _grid_quantize(wg: torch.Tensor, bits: int, cfg: RTNConfig, clip: torch.Tensor | float = 1.0):
    scale, zero, bias = affine_params(wg, bits, cfg.symmetric, "int", cfg.torch_scale_dtype, clip)
    return quantize_codes(wg, scale, zero, bias, bits), scale, zero, bias


def _quantize_groups(wg: torch.Tensor, cfg: RTNConfig, clip: torch.Tensor | float = 1.0):
    if not cfg.symmetric and cfg.zero_point == "float":
        return _mlx_quantize(wg, cfg.bits, cfg.torch_scale_dtype, clip)
    return _grid_quantize(wg, cfg.bits, cfg, clip)


def _best_clip(wg: torch.Tensor, cfg: RTNConfig) -> torch.Tensor:
    """Per-group shrink factor minimising that group's reconstruction MSE (all groups at once).

    The loop runs over the ~50 candidate factors, never over groups; 1.0 is tried first and only a strictly
    smaller error replaces it, so the result is never worse than plain RTN.
    """
    best_err = torch.full(wg.shape[:-1], float("inf"))
    best_clip = torch.ones(wg.shape[:-1])
    for c in MSE_CLIP_GRID.tolist():
        q, s, z, b = _quantize_groups(wg, cfg, c)
        err = (dequantize_codes(q, s, z, b, cfg.bits) - wg).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, torch.full_like(best_clip, c), best_clip)
    return best_clip


def quantize_weight(w: torch.Tensor, cfg: RTNConfig) -> AffineRecord | FPRecord:
    """``w [out, in]`` float32 -> AffineRecord (groups along the input dim), or FPRecord in a float mode."""
    if cfg.mode != "affine":   # mse_clip: each block's scale byte searched (no longer mx.quantize's bytes)
        from macq.quantizers.mxfp import mlx_fp_quantize, mse_fp_quantize

        codes, scales = (mse_fp_quantize if cfg.mse_clip else mlx_fp_quantize)(w, cfg.mode, cfg.torch_scale_dtype)
        return FPRecord(codes=codes, scales=scales, mode=cfg.mode)
    out, inp = w.shape
    w = w.float()
    per_tensor = cfg.group_size == -1
    g = inp if cfg.group_size in (0, -1) else cfg.group_size
    check(inp % g == 0, f"--group-size {cfg.group_size} does not divide the input dim {inp}")
    wg = w.reshape(1, 1, out * inp) if per_tensor else w.view(out, inp // g, g)
    clip = _best_clip(wg, cfg) if cfg.mse_clip else 1.0
    q, s, z, b = _quantize_groups(wg, cfg, clip)
    sd = cfg.torch_scale_dtype
    return AffineRecord(codes=q.reshape(out, inp), scales=s.to(sd), bits=cfg.bits, group_size=g,
                        zeros=None if z is None else z.to(torch.uint8),
                        biases=None if b is None else b.to(sd), per_tensor=per_tensor)

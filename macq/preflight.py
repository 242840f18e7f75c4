"""Checks that run before any weight is loaded: the request against the model's config and the target.

``quantize`` / ``export`` used to find out after minutes of GPTQ that MLX cannot hold 7-bit codes, or that
the default group size does not divide the model's hidden size. Everything knowable from ``config.json``
(read alone, no weights) and the options is decided here:

* the model's architecture is one macq (and the target) knows;
* the method config is complete: a target's preferred defaults for options the user left unset
  (:data:`TARGET_DEFAULTS`) and, when ``--group-size`` is not given, the largest of 128/64/32 that divides
  every quantized input dim (found on a weightless ``meta`` copy of the model, so skips and embeddings count);
* every quantized module's (possibly overridden) group divides its input dim;
* the records the method will produce are ones the target can hold (bits, groups, LUT vs affine, act-quant).
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from macq.errors import MacqError
from macq.quantizers import method_spec

AUTO_GROUPS = (128, 64, 32)

# The best form each target can hold, applied to options the user did not give (only to configs that
# have the field). MLX stores a float scale *and* a float bias per group whatever the records hold, so an
# asymmetric grid with a float zero (MLX's own affine algorithm, bit-identical to mlx_lm.convert) costs no
# byte more than a symmetric one and fits each group's range: SmolLM2 3-bit g64 with embeddings scored wiki
# ppl 912 symmetric vs 115 for mlx_lm.convert (issue 12). Core ML's constexpr_blockwise_shift_scale holds an
# integer offset exactly, and a float one only approximately, so its best exact form is the integer zero.
TARGET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlx": {"symmetric": False, "zero_point": "float"},
    "coreml": {"symmetric": False, "zero_point": "int"},
}


def model_config(model: str | None, trust_remote_code: bool = False):
    """The model's HF config from ``config.json`` alone (no weights)."""
    from transformers import AutoConfig

    from macq.models import resolve_model_path

    path = resolve_model_path(model)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    p = Path(path)
    if p.suffix == ".gguf":
        kw["gguf_file"], path = p.name, str(p.parent)
    try:
        return AutoConfig.from_pretrained(path, **kw)
    except Exception as e:  # noqa: BLE001 - a bad or unreadable config is the user's input: one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise MacqError(f"model: cannot read the config of {model!r}: {first}") from None


def quantized_shapes(config, cfg) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of what ``cfg`` will quantize, from a weightless (meta) model."""
    from transformers import AutoModelForCausalLM

    from macq.arch import arch_spec
    from macq.models import get_weight, quantizable_modules

    arch_spec(config.model_type)  # one-line error for an architecture macq has no row for
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001
        raise MacqError(f"model: cannot build model_type {config.model_type!r} from its config: {str(e)[:200]}") from None
    mods = quantizable_modules(meta, getattr(cfg, "include_embeddings", False), getattr(cfg, "include_lm_head", False),
                               tuple(getattr(cfg, "skip", ())))
    return {name: tuple(get_weight(m).shape) for name, m in mods.items()}  # type: ignore[misc]


def _input_group_fields(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("groups") == "input"]


def resolve_config(method: str, given: dict[str, Any], config, target: str | None = None,
                   cli: dict[str, Any] | None = None) -> tuple[Any, list[str]]:
    """Build and check the method config for this model and target; returns ``(cfg, notes)``.

    ``given``: options the user set. ``cli``: command-level values (calibration, seed, target) passed to
    configs that have a field of that name."""
    from macq.options import check_applicable

    spec = method_spec(method)
    cls, _ = spec.load()
    names = {f.name for f in fields(cls)}
    check_applicable(method, given)
    if given.get("overrides") and spec.kind != "weight":
        raise MacqError(f"--override: honoured by weight methods (rtn, nf4, fp4, kmeans, uniform), not --method {method}")
    opts = {k: v for k, v in (cli or {}).items() if k in names and v is not None}
    for k, v in TARGET_DEFAULTS.get(target or "", {}).items():
        if k in names and k not in given:
            opts[k] = v
    opts.update(given)
    notes: list[str] = []
    cfg = cls.from_kwargs(**opts)  # validates every value (one line naming the flag)
    shapes = quantized_shapes(config, cfg)
    for fname in _input_group_fields(cls):
        if fname in given:
            continue
        if fname == "group_size" and getattr(cfg, "mode", "affine") == "affine":   # a float mode fixes its block
            g = auto_group_size(shapes)
            cfg = replace(cfg, group_size=g)
            notes.append(f"--group-size {g} (largest of {'/'.join(map(str, AUTO_GROUPS))} dividing every quantized "
                         "input dim of the model)")
    check_groups(cfg, shapes)
    return cfg, notes


def auto_group_size(shapes: dict[str, tuple[int, int]]) -> int:
    dims = sorted({inp for _, inp in shapes.values()})
    for g in AUTO_GROUPS:
        if all(d % g == 0 for d in dims):
            return g
    raise MacqError(f"--group-size: none of {', '.join(map(str, AUTO_GROUPS))} divides every quantized input dim "
                    f"({', '.join(map(str, dims))}); pass --group-size (0: per channel)")


def check_groups(cfg, shapes: dict[str, tuple[int, int]]) -> None:
    """Every input-dim group (after per-module overrides) divides that module's input dim."""
    for name, (_, inp) in shapes.items():
        c = cfg.for_module(name)
        for fname in _input_group_fields(type(c)):
            g = getattr(c, fname)
            if g > 0 and inp % g:
                raise MacqError(f"--{fname.replace('_', '-')} {g} does not divide {name}'s input dim {inp}")


def check_target(target: str, method: str, cfg, config, *, output: Path | None = None, dtype: str = "float16", context: int = 512,
                 requantize_lut: bool = False, allow_fallback: bool = False, chunked: bool = False) -> None:
    """Refuse, before any work, what the target cannot hold. ``cfg`` is None when exporting existing records
    (then only the model and output checks apply; the exporter checks every record before writing)."""
    model_type = config.model_type
    if target == "mlx":
        from mlx_backend.layout import MLX_BITS, MLX_GROUPS, mlx_arch, torch_dtype

        torch_dtype(dtype)
        mlx_arch(model_type)
        if cfg is None:
            return
        kind = method_spec(method).records
        if kind == "lut" and not requantize_lut:
            raise MacqError(f"--method {method}: writes look-up-table codes, which MLX cannot hold; use an affine "
                            "method (rtn, gptq, awq, awq-gptq, mixed) or pass --requantize-lut (lossy)")
        if kind == "affine" and getattr(cfg, "mode", "affine") == "affine":   # float modes: fixed bits / block
            bits = getattr(cfg, "bits", getattr(cfg, "weight_bits", None))
            group = getattr(cfg, "group_size", 0)
            if bits is not None and bits not in MLX_BITS:
                raise MacqError(f"--bits {bits}: MLX affine holds {', '.join(map(str, MLX_BITS))} bits")
            if group not in MLX_GROUPS:
                what = "per channel" if group in (0, None) else "per tensor" if group == -1 else str(group)
                raise MacqError(f"--group-size {what}: MLX affine holds groups of {', '.join(map(str, MLX_GROUPS))}")
            for rx, kv in cfg.parsed_overrides() if hasattr(cfg, "parsed_overrides") else []:
                if kv.get("mode", "affine") == "affine" and (kv.get("bits", bits) not in MLX_BITS
                                                             or kv.get("group_size", group) not in MLX_GROUPS):
                    raise MacqError(f"--override {rx.pattern}: MLX affine holds bits {MLX_BITS} with groups {MLX_GROUPS}")
        return
    from converters.weights import LUT_BITS, fp_refusal
    from macq.arch import arch_spec

    if getattr(cfg, "mode", "affine") != "affine":   # float modes (mxfp4/nvfp4/mxfp8): no compact exact Core ML form
        raise fp_refusal(cfg.mode)

    if output is not None and output.suffix != ".mlpackage" and not chunked:
        raise MacqError(f"--output {output}: a Core ML export must end in .mlpackage (a chunked one is a directory)")
    arch_spec(model_type).coreml_support(config)   # one line naming the family when Core ML cannot hold it
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context < 2 or (max_pos and context > max_pos):
        raise MacqError(f"--context {context}: expected an int in [2, {max_pos}]")
    if cfg is None:
        return
    if method_spec(method).activations:
        raise MacqError(f"--method {method}: activation quantization cannot be expressed in a Core ML weight-only export")
    if method_spec(method).records == "lut" and getattr(cfg, "bits", 4) not in LUT_BITS:
        raise MacqError(f"--bits {cfg.bits}: Core ML LUT indices hold {', '.join(map(str, LUT_BITS))} bits")
    if getattr(cfg, "zero_point", "int") == "float" and not getattr(cfg, "symmetric", True) and not allow_fallback:
        raise MacqError("--zero-point float: Core ML holds integer zero-points exactly; use --zero-point int "
                        "(or --allow-fallback for an approximate bias form)")

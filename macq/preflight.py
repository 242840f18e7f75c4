"""Checks that run before any weight is loaded: the request against the model's config and the target.

``quantize`` / ``export`` used to find out after minutes of GPTQ that MLX cannot hold 7-bit codes, or that
the default group size does not divide the model's hidden size. Everything knowable from ``config.json``
(read alone, no weights) and the options is decided here:

* the model's architecture is one macq (and the target) knows;
* the method config is complete: a target's preferred defaults for options the user left unset
  (``defaults`` in its row of :data:`macq.targets.TARGETS`) and, when ``--group-size`` is not given, the largest of 128/64/32 that divides
  every quantized input dim (found on a weightless ``meta`` copy of the model, so skips and embeddings count);
* every quantized module's (possibly overridden) group divides its input dim.

What the target can hold is checked by the target's own row (:mod:`macq.targets`).
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from macq.errors import MacqError
from macq.quantizers import method_spec

AUTO_GROUPS = (128, 64, 32)

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
    from macq.targets import TARGETS

    opts = {k: v for k, v in (cli or {}).items() if k in names and v is not None}
    for k, v in (TARGETS[target].defaults if target in TARGETS else {}).items():
        if k in names and k not in given:
            opts[k] = v
    opts.update(given)
    notes: list[str] = []
    cfg = cls.from_kwargs(**opts)  # validates every value (one line naming the flag)
    shapes = quantized_shapes(config, cfg)
    from macq.integrity import check_config_selection  # a --skip / --override that selects nothing is refused

    check_config_selection(cfg, quantized_shapes(config, replace(cfg, skip=())) if getattr(cfg, "skip", ()) else shapes)
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

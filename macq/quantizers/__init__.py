"""Quantizer registry: method name -> (config class, function), as a data table.

Weight methods map one ``[out, in]`` float weight to one record and need no data. Model methods take the
model and calibration token ids and return a :class:`~macq.qmodel.QuantizedModel` (they may fold scales
into float weights, e.g. AWQ). Entries are imported lazily so that ``macq --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from macq.errors import MacqError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: str          # macq.quantizers.<module>
    config: str          # config class name in that module
    function: str        # quantize_weight(w, cfg) -> Record   or   quantize_model(model, cfg, calib, progress) -> QuantizedModel
    kind: str            # "weight" | "model"
    needs_calibration: bool = False
    records: str = "affine"  # what it produces: "affine" | "lut" | "any" (chosen per layer), read by target checks
    activations: bool = False  # also quantizes activations (act_quant hooks), which weight-only targets cannot hold

    def load(self) -> tuple[type, Callable[..., Any]]:
        mod = importlib.import_module(f"macq.quantizers.{self.module}")
        return getattr(mod, self.config), getattr(mod, self.function)


METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("rtn", "rtn", "RTNConfig", "quantize_weight", "weight"),
    MethodSpec("nf4", "normalfloat", "NF4Config", "quantize_weight", "weight", records="lut"),
    MethodSpec("fp4", "normalfloat", "FP4Config", "quantize_weight", "weight", records="lut"),
    MethodSpec("kmeans", "palettize", "KMeansConfig", "quantize_weight", "weight", records="lut"),
    MethodSpec("uniform", "palettize", "UniformConfig", "quantize_weight", "weight", records="lut"),
    MethodSpec("gptq", "gptq", "GPTQConfig", "quantize_model", "model", True),
    MethodSpec("awq", "awq", "AWQConfig", "quantize_model", "model", True),
    MethodSpec("awq-gptq", "awq", "AWQGPTQConfig", "quantize_model", "model", True),
    MethodSpec("smoothquant", "smoothquant", "SmoothQuantConfig", "quantize_model", "model", True, activations=True),
    MethodSpec("mixed", "mixed", "MixedConfig", "quantize_model", "model", True, records="any"),
    MethodSpec("dkm", "dkm", "DKMConfig", "quantize_model", "model", True, records="lut"),
)}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise MacqError(f"--method {name!r}: expected one of {', '.join(METHODS)}") from None


def make_config(method: str, **kw: Any):
    cls, _ = method_spec(method).load()
    return cls.from_kwargs(**kw)


def quantize_weights(model: nn.Module, cfg, fn: Callable[..., Any], progress: bool = False) -> dict[str, Any]:
    """Apply a weight method to every selected module; returns ``{module: record}``."""
    from macq.models import get_weight, is_conv1d, quantizable_modules
    from macq.progress import track

    mods = quantizable_modules(model, cfg.include_embeddings, cfg.include_lm_head, tuple(cfg.skip))
    records = {}
    for name, mod in track(list(mods.items()), "quantizing", enabled=progress):
        rec = fn(get_weight(mod).detach().float(), cfg.for_module(name))
        rec.transposed = is_conv1d(mod)
        records[name] = rec
    return records


def quantize_model(model: nn.Module, method: str, cfg=None, calib: torch.Tensor | None = None,
                   progress: bool = False, source: str = "", **kw: Any):
    """Quantize ``model`` with ``method``; returns a QuantizedModel. ``model`` may be modified in place
    by model methods (scale folding); pass a copy if the float model is still needed."""
    from macq.qmodel import QuantizedModel

    spec = method_spec(method)
    cls, fn = spec.load()
    cfg = cfg if cfg is not None else cls.from_kwargs(**kw)
    if spec.kind == "weight":
        records = quantize_weights(model, cfg, fn, progress)
        return QuantizedModel.from_model(model, records, method=cfg.to_dict(), source=source)
    if spec.needs_calibration and calib is None:
        raise MacqError(f"--method {method} needs calibration data")
    return fn(model, cfg, calib, progress=progress, source=source)

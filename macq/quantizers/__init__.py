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
    heads: bool = False  # model method for decoder linears; embedding / lm_head (when asked) get head_records()
    stream: str = ""     # per-layer step (``layer_quantizer(model, cfg, device) -> LayerJob``) for the streaming engine
    # the method calls head_records() itself in memory (not ``heads``, which the registry applies before the
    # method runs): the streaming engine quantizes the embedding / lm_head the same way for it
    stream_heads: bool = False
    whole_model: str = ""  # why the method cannot stream at all (the --stream refusal says so)
    summary: str = ""      # one line for ``--help``, ``macq methods`` and the docs
    cost: str = ""         # what it costs to run, in words (``macq methods``)

    def load(self) -> tuple[type, Callable[..., Any]]:
        mod = importlib.import_module(f"macq.quantizers.{self.module}")
        return getattr(mod, self.config), getattr(mod, self.function)

    @property
    def streams(self) -> bool:
        """Runs on the streaming path: weight methods tensor by tensor, calibrated ones with a ``stream`` step."""
        return self.kind == "weight" or bool(self.stream)

    def layer_quantizer(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"macq.quantizers.{self.module}"), self.stream)


METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("rtn", "rtn", "RTNConfig", "quantize_weight", "weight",
               summary="round to nearest on an affine grid (per group, optional MSE clip); data-free", cost="seconds"),
    MethodSpec("nf4", "normalfloat", "NF4Config", "quantize_weight", "weight", records="lut",
               summary="NormalFloat-4 look-up table with a per-block absmax (bitsandbytes NF4); data-free", cost="seconds"),
    MethodSpec("fp4", "normalfloat", "FP4Config", "quantize_weight", "weight", records="lut",
               summary="FP4 (E2M1) look-up table with a per-block absmax (bitsandbytes FP4); data-free", cost="seconds"),
    MethodSpec("kmeans", "palettize", "KMeansConfig", "quantize_weight", "weight", records="lut",
               summary="optimal 1-D k-means look-up tables per group of rows (Core ML palettization); data-free",
               cost="minutes (exact solver)"),
    MethodSpec("uniform", "palettize", "UniformConfig", "quantize_weight", "weight", records="lut",
               summary="uniform look-up table per group of rows; data-free", cost="seconds"),
    MethodSpec("gptq", "gptq", "GPTQConfig", "quantize_model", "model", True, heads=True, stream="layer_quantizer",
               summary="GPTQ: second-order error compensation per layer on calibration activations",
               cost="one Hessian per linear; layer-streamed"),
    MethodSpec("awq", "awq", "AWQConfig", "quantize_model", "model", True, heads=True, stream="layer_quantizer",
               summary="AWQ: activation-aware per-channel scales and clipping searched per layer",
               cost="a grid search per layer; layer-streamed"),
    MethodSpec("awq-gptq", "awq", "AWQGPTQConfig", "quantize_model", "model", True, heads=True,
               stream="layer_quantizer", summary="AWQ scales, then GPTQ rounding onto AWQ's grid",
               cost="AWQ + GPTQ per layer; layer-streamed"),
    MethodSpec("smoothquant", "smoothquant", "SmoothQuantConfig", "quantize_model", "model", True, activations=True,
               stream="layer_quantizer", summary="SmoothQuant W8A8: activation outliers migrated into the weights",
               cost="one pass of activation statistics; layer-streamed"),
    MethodSpec("mixed", "mixed", "MixedConfig", "quantize_model", "model", True, records="any",
               stream="layer_quantizer", summary="mixed precision: per-layer formats chosen by measured sensitivity "
               "under a bits budget", cost="a sensitivity pass plus the chosen methods"),
    MethodSpec("dkm", "dkm", "DKMConfig", "quantize_model", "model", True, records="lut",
               whole_model="it trains every layer's clustering end to end through the whole model",
               summary="DKM: differentiable k-means palettization trained end to end", cost="training steps; in memory"),
    # learned and kmeans-cal quantize their own embedding / head: learned's logits stage needs the float head first
    # and tunes it; kmeans-cal's Fisher-weighted k-means of the heads needs the float model's sensitivities. Streamed
    # (without those whole-model stages: their configs' stream_refusal) the engine gives them head_records().
    MethodSpec("learned", "learned", "LearnedConfig", "quantize_model", "model", True, stream="layer_quantizer",
               stream_heads=True, summary="best affine quality: AWQ init, learned rounding per layer, then a logits-KL "
               "stage", cost="the slowest affine method (backprop per layer and through the model)"),
    MethodSpec("kmeans-cal", "kmeans_cal", "KMeansCalConfig", "quantize_model", "model", True, records="lut",
               stream="layer_quantizer", stream_heads=True, summary="best LUT quality: Fisher-weighted k-means "
               "refined on calibration outputs (Core ML, Core AI)", cost="Fisher sensitivities plus a per-layer fit"),
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
    if getattr(cfg, "recipe", None) is not None and hasattr(cfg, "bind_layers"):
        cfg = cfg.bind_layers(layer_index(model, list(mods), cfg.recipe))
    records = {}
    for name, mod in track(list(mods.items()), "quantizing", enabled=progress):
        rec = fn(get_weight(mod).detach().float(), cfg.for_module(name))
        rec.transposed = is_conv1d(mod)
        records[name] = rec
    return records


def layer_index(model: nn.Module, names: list[str], recipe: str):
    """The decoder-layer numbering a per-layer recipe reads (count, and where the number sits in a path)."""
    from macq.arch import arch_spec, decoder_layers
    from macq.quantizers.mlx_recipes import mlx_lm_layer_index

    return mlx_lm_layer_index(names, arch_spec(model).layers, len(decoder_layers(model)), recipe)


def quantize_model(model: nn.Module, method: str, cfg=None, calib: torch.Tensor | None = None,
                   progress: bool = False, source: str = "", **kw: Any):
    """Quantize ``model`` with ``method``; returns a QuantizedModel. ``model`` may be modified in place
    by model methods (scale folding); pass a copy if the float model is still needed."""
    from macq.models import set_weight
    from macq.qmodel import QuantizedModel

    spec = method_spec(method)
    cls, fn = spec.load()
    cfg = cfg if cfg is not None else cls.from_kwargs(**kw)
    if spec.kind == "weight":
        records = quantize_weights(model, cfg, fn, progress)
        return QuantizedModel.from_model(model, records, method=cfg.to_dict(), source=source)
    if spec.needs_calibration and calib is None:
        raise MacqError(f"--method {method} needs calibration data")
    if not spec.heads:
        return fn(model, cfg, calib, progress=progress, source=source)
    # Quantized first and written back, so the method calibrates on the inputs it will see at inference.
    head = _float_head(model, cfg)
    heads = head_records(model, cfg)
    for name, rec in heads.items():
        set_weight(model.get_submodule(name), rec.dequantize(torch.float32))
    qm = fn(model, cfg, calib, progress=progress, source=source)
    if not heads:
        return qm
    method = qm.method
    if head is not None:   # --head-gptq: the logits' record again, by GPTQ on the quantized model's hidden states
        from macq.quantizers.head import gptq_head

        heads[head[0]], st = gptq_head(model, cfg, calib, *head)
        heads[head[0]].transposed = False
        set_weight(model.get_submodule(head[0]), heads[head[0]].dequantize(torch.float32))
        method = {**method, "stats": {**method.get("stats", {}), "head": {head[0]: st}}}
    return QuantizedModel.from_model(model, {**qm.records, **heads}, method=method, act_quant=qm.act_quant,
                                     source=qm.source)


def _float_head(model: nn.Module, cfg) -> tuple[str, torch.Tensor] | None:
    """``(name, float weight)`` of the logits' record when ``cfg`` asks for ``--head-gptq``, else None."""
    if not getattr(cfg, "head_gptq", False):
        return None
    from macq.models import get_weight
    from macq.quantizers.head import head_module

    name = head_module(model, cfg)
    if name is None:
        raise MacqError("--head-gptq: the head is not quantized; pass --include-lm-head")
    return name, get_weight(model.get_submodule(name)).detach().float().clone()


def head_records(model: nn.Module, cfg) -> dict[str, Any]:
    """Records for the embedding / lm_head a calibrated method was asked to include, at the method's bits.

    Why not the method itself: the embedding is a lookup (no input activations to calibrate against) and
    the tied head's input is the last norm's output, outside every decoder layer. They get the best
    data-free quantizer of the method's own format: RTN with per-group MSE clipping (never worse than plain
    RTN on weight error) for affine methods, k-means for LUT methods; so rows compare at equal size.
    """
    from macq.models import get_weight, is_conv1d, quantizable_modules

    if not (cfg.include_embeddings or cfg.include_lm_head):
        return {}
    decoder = set(quantizable_modules(model, False, False))
    mods = {n: m for n, m in quantizable_modules(model, cfg.include_embeddings, cfg.include_lm_head).items()
            if n not in decoder}
    name_of, hcfg, fn = head_quantizer(cfg)
    out = {}
    for name, mod in mods.items():
        rec = fn(get_weight(mod).detach().float(), hcfg)
        rec.transposed = is_conv1d(mod)
        out[name] = rec
    return out


def head_quantizer(cfg) -> tuple[str, Any, Callable[..., Any]]:
    """``(weight method, its config, quantize_weight)`` that :func:`head_records` applies to the embedding /
    lm_head of a calibrated method's ``cfg`` (also used tensor by tensor by the streaming engine)."""
    if hasattr(cfg, "granularity"):
        from macq.quantizers.palettize import KMeansConfig
        from macq.quantizers.palettize import quantize_weight as lut_weight

        return "kmeans", KMeansConfig(bits=cfg.bits, granularity=cfg.granularity, group_size=cfg.group_size,
                                      n_init=getattr(cfg, "n_init", 4), seed=getattr(cfg, "seed", 0),
                                      outlier_frac=getattr(cfg, "outlier_frac", 0.0)), lut_weight
    from macq.quantizers.rtn import RTNConfig
    from macq.quantizers.rtn import quantize_weight as rtn_weight

    return "rtn", RTNConfig(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, zero_point="int",
                            mse_clip=True, scale_dtype=cfg.scale_dtype, mode=getattr(cfg, "mode", "affine")), rtn_weight

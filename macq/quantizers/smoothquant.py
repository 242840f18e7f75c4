"""SmoothQuant W8A8: migrate activation outliers into the weights, then int8 weights and simulated int8 inputs.

Per decoder layer (through the shared :func:`~macq.quantizers.calibration.layerwise` engine):

1. collect each linear group's per-channel input ``max|X_j|`` (:mod:`macq.quantizers.actquant`);
2. for each foldable ``ArchSpec.mappings`` entry, ``s_j = max|X_j|^α / max|W_j|^(1−α)`` (``max|W_j|`` over
   all the mapping's linears) is folded into the producer (:mod:`macq.quantizers.fold`): float function
   unchanged, but the inputs' per-channel ranges are flattened so per-token / per-tensor int8 loses less;
3. every target linear's weight becomes a per-output-channel symmetric int8 :class:`AffineRecord` (shared
   grid), and its input is fake-quantized by hooks (``act_quant``: per-token dynamic absmax, or per-tensor
   with a static scale: the calibration absmax of the smoothed input, measured on this layer's inputs from
   the already-quantized previous layers, before this layer's weights are rounded). The hooks stay on the layer so the next
   layer is calibrated on W8A8 outputs, and stay on the returned in-place model too: it *is* the W8A8 model,
   identical to ``QuantizedModel.to_torch()``. Call :func:`~macq.quantizers.actquant.remove_act_quant` to drop them.

Mappings whose channels do not correspond (GQA ``v_proj → o_proj``) are not smoothed; GPT-2's
``attn.c_proj`` / ``mlp.c_proj`` have no mapping either. Those linears are still W8A8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from macq.arch import ArchSpec, arch_spec
from macq.device import resolve_device, wide_float
from macq.errors import MacqError
from macq.models import get_weight, is_conv1d, quantizable_modules, set_weight
from macq.progress import stage
from macq.quantizers.activations import StreamOptions
from macq.quantizers.actquant import ACT_MODES, InputStats, collect_input_stats, input_groups, install_act_quant
from macq.quantizers.base import QuantConfig, check, check_model_inputs
from macq.quantizers.calibration import LayerInputs, layerwise, run_job, target_linears
from macq.quantizers.fold import can_fold, fold_scales
from macq.quantizers.grid import SCALE_DTYPES, affine_params, quantize_codes
from macq.record import AffineRecord


@dataclass
class SmoothQuantConfig(StreamOptions, QuantConfig):
    method = "smoothquant"
    alpha: float = 0.5               # migration strength: 0 = all range to activations, 1 = all to weights
    smooth: bool = True              # False: plain W8A8 with no smoothing (the baseline SmoothQuant fixes)
    act_mode: str = "per_token"      # "per_token" (dynamic) | "per_tensor_static" (calibrated scale)
    act_bits: int = 8
    weight_bits: int = 8             # per-output-channel symmetric
    scale_dtype: str = "float16"
    batch_size: int = 8

    def __post_init__(self) -> None:
        check(0.0 <= self.alpha <= 1.0, f"alpha={self.alpha}: expected in [0, 1]")
        check(self.act_mode in ACT_MODES, f"act_mode={self.act_mode!r}: expected one of {', '.join(ACT_MODES)}")
        check(self.act_bits in range(2, 17), f"act_bits={self.act_bits}: expected 2..16")
        check(self.weight_bits in range(2, 9), f"weight_bits={self.weight_bits}: expected 2..8")
        check(self.scale_dtype in SCALE_DTYPES, f"--scale-dtype {self.scale_dtype}: expected one of {', '.join(SCALE_DTYPES)}")
        check(self.batch_size >= 1, f"batch_size={self.batch_size}: expected >= 1")
        check(not self.include_embeddings and not self.include_lm_head,
              "smoothquant quantizes the decoder linears only (embeddings / lm_head: use rtn)")
        self.check_stream_options()


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = x_max^α / w_max^(1−α)``; channels that are dead on either side keep ``s = 1``."""
    live = (x_max > 0) & (w_max > 0)
    wide = wide_float(x_max.device)
    s = x_max.clamp_min(1e-12).to(wide).pow(alpha) / w_max.clamp_min(1e-12).to(wide).pow(1 - alpha)
    return torch.where(live, s.clamp(1e-5, 1e5), torch.ones_like(s)).float()


@torch.no_grad()
def smooth_layer(layer: nn.Module, spec: ArchSpec, st: dict[tuple[str, ...], InputStats], alpha: float,
                 path: str = "") -> dict[str, dict[str, Any]]:
    """Fold smoothing scales for every foldable mapping of ``layer`` (in place); rescales ``st``."""
    out: dict[str, dict[str, Any]] = {}
    group_of = {n: g for g in st for n in g}
    for m in spec.mappings:
        key = f"{path}.{m.prev}" if path else m.prev
        if not can_fold(layer, m):
            out[key] = {"folded": False}
            continue
        grp = group_of[m.linears[0]]
        if set(grp) != set(m.linears):
            raise MacqError(f"arch table: mapping {m.prev} -> {m.linears} does not cover {grp}")
        w_max = torch.stack([get_weight(layer.get_submodule(n)).detach().abs().amax(0).float() for n in m.linears]).amax(0)
        x_before = float(st[grp].absmax.max() / st[grp].absmax.clamp_min(1e-12).median())
        s = smoothing_scales(st[grp].absmax, w_max, alpha)
        fold_scales(layer, m, s)
        st[grp].rescale(s)
        out[key] = {"folded": True, "act_outlier_ratio_before": x_before,
                    "act_outlier_ratio_after": float(st[grp].absmax.max() / st[grp].absmax.clamp_min(1e-12).median())}
    return out


def int8_record(w: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> AffineRecord:
    """Per-output-channel symmetric record on the shared grid (one group spanning the input dim)."""
    wg = w.float().unsqueeze(1)                           # [out, 1, in]
    scale, zero, bias = affine_params(wg, bits, True, "int", scale_dtype)
    codes = quantize_codes(wg, scale, zero, bias, bits).reshape(w.shape)
    return AffineRecord(codes=codes, scales=scale.to(scale_dtype), bits=bits, group_size=w.shape[1])


def layer_quantizer(model: nn.Module, cfg: SmoothQuantConfig, device: torch.device | None = None):
    """SmoothQuant's per-layer step, as :func:`~macq.quantizers.calibration.layerwise` and the streaming engine
    (:mod:`macq.quantizers.stream_calib`) drive it (``model`` is only read for module names and config): input
    ranges, smoothing folded into the producers, int8 records, and the act-quant hooks installed on the layer so
    that the next layer is calibrated on W8A8 outputs. ``job.act_quant`` fills with each linear's input
    quantization (the manifest's ``act_quant``); ``job.stats`` with each mapping's outlier ratios."""
    from macq.quantizers.calibration import LayerJob

    spec = arch_spec(model).resolved(model.config)
    targets = set(quantizable_modules(model, False, False, tuple(cfg.skip)))
    sd = SCALE_DTYPES[cfg.scale_dtype]
    records: dict[str, AffineRecord] = {}
    act_quant: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, Any]] = {}
    qmax = 2 ** (cfg.act_bits - 1) - 1

    @torch.no_grad()
    def fn(_i: int, path: str, layer: nn.Module, inputs: LayerInputs) -> None:
        groups = input_groups(layer, spec.sequence)
        with stage("stats"):
            st = collect_input_stats(layer, inputs, groups)
        with stage("round"):
            if cfg.smooth:
                stats.update(smooth_layer(layer, spec, st, cfg.alpha, path))
            layer_aq: dict[str, dict[str, Any]] = {}
            for grp, full, mod in target_linears(layer, path, groups, targets):
                rec = int8_record(get_weight(mod).detach(), cfg.weight_bits, sd)
                rec.transposed = is_conv1d(mod)
                set_weight(mod, rec.dequantize(torch.float32))
                records[full] = rec
                aq: dict[str, Any] = {"bits": cfg.act_bits, "mode": cfg.act_mode}
                if cfg.act_mode == "per_tensor_static":
                    aq["scale"] = max(float(st[grp].absmax.max()) / qmax, 1e-8)
                act_quant[full] = layer_aq[full[len(path) + 1:]] = aq
            install_act_quant(layer, layer_aq)

    return LayerJob(fn, records, stats, device or torch.device("cpu"), cfg.batch_size, stats_in_manifest=True,
                    act_quant=act_quant)


def quantize_model(model: nn.Module, cfg: SmoothQuantConfig, calib_ids: torch.Tensor, progress: bool = False,
                   source: str = ""):
    """SmoothQuant W8A8 ``model`` in place; returns a QuantizedModel with records and ``act_quant``."""
    from macq.qmodel import QuantizedModel

    check_model_inputs("smoothquant", cfg, SmoothQuantConfig, calib_ids)
    job = layer_quantizer(model, cfg, resolve_device(cfg.device))
    run_job(model, calib_ids, job, progress, "smoothquant")
    method = cfg.to_dict()
    method["stats"] = job.stats
    return QuantizedModel.from_model(model, job.records, method=method, act_quant=job.act_quant, source=source)


@torch.no_grad()
def smooth_model(model: nn.Module, calib_ids: torch.Tensor, alpha: float = 0.5, batch_size: int = 8
                 ) -> dict[str, dict[str, Any]]:
    """Smoothing alone (no quantization), in place: the float model computes the same function."""
    spec = arch_spec(model).resolved(model.config)
    stats: dict[str, dict[str, Any]] = {}

    def fn(_i: int, path: str, layer: nn.Module, inputs: LayerInputs) -> None:
        st = collect_input_stats(layer, inputs, input_groups(layer, spec.sequence))
        stats.update(smooth_layer(layer, spec, st, alpha, path))

    layerwise(model, calib_ids, fn, batch_size=batch_size)
    return stats

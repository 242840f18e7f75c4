"""AWQ (activation-aware weight quantization) and AWQ→GPTQ chaining, layer by layer.

Per decoder layer (driven by :func:`macq.quantizers.calibration.layerwise`, so each layer sees the
already-quantized previous layers' outputs):

1. one pass over the calibration inputs collects, per group of linears sharing an input, ``E|x|``,
   ``E[x]`` and ``H = XᵀX`` (:mod:`macq.quantizers.actquant`);
2. for each foldable ``ArchSpec.mappings`` entry, search ``s = salience^α`` over α ∈ [0, 1) for the lowest
   exact output error of the mapping's linears after rounding ``W·diag(s)``, then fold ``s`` into the
   producer (:mod:`macq.quantizers.fold`) — the model is unchanged in float; statistics are rescaled;
3. per linear: per-group clipping search, then rounding — nearest (optionally greedy-corrected) for
   ``awq``, GPTQ with the scaled-input Hessian for ``awq-gptq`` — and the dequantized weight is written
   back so the next layer is calibrated on quantized outputs. Records are exactly what is left in the model.

In MLX's float modes (``mode="mxfp4" | "nvfp4" | "mxfp8"``) the grid is :mod:`macq.quantizers.mxfp`'s: the α
search rounds with the data-free scale search, the clip search becomes a choice among each block's few scale
bytes ranked by the same output error, and the records are :class:`~macq.record.FPRecord` in MLX's bytes.

Architecture differences live only in ``ArchSpec.mappings`` / ``ArchSpec.sequence``. Mappings whose
channels do not correspond (GQA ``v_proj → o_proj``) are skipped; those linears get clip search only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from macq.arch import ArchSpec, arch_spec
from macq.device import has_float64, resolve_device
from macq.errors import MacqError
from macq.microscale import fp_format
from macq.models import get_weight, is_conv1d, quantizable_modules, set_weight
from macq.progress import stage
from macq.quantizers import awq_search as S
from macq.quantizers.activations import StreamOptions
from macq.quantizers.actquant import InputStats, collect_input_stats, input_groups
from macq.quantizers.base import HeadOptions, QuantConfig, check, check_bits, check_model_inputs
from macq.quantizers.calibration import LayerInputs, LayerJob, layerwise, run_job, target_linears
from macq.quantizers.fold import can_fold, fold_scales
from macq.quantizers.grid import SCALE_DTYPES, ScaleOptions
from macq.quantizers.mxfp import block_scales, round_on
from macq.record import AffineRecord, FPRecord, record_to

SALIENCE = ("mean_abs", "l2")


@dataclass
class AWQConfig(HeadOptions, StreamOptions, ScaleOptions, QuantConfig):
    method = "awq"
    bits: int = 4
    group_size: int = field(default=128, metadata={
        "groups": "input", "help": "input elements per group (unset: largest of 128/64/32 dividing the model's dims); 0 per channel"})
    symmetric: bool = False          # default: asymmetric group-wise (integer zero-point)
    n_grid: int = 20                 # α candidates k / n_grid, k = 0..n_grid-1
    salience: str = "mean_abs"       # s = E|x|^α   |  "l2": s = E[x²]^(α/2)
    duo_scaling: bool = False        # s = x^α / w^(1−α) (AutoAWQ's duo scaling)
    clip_search: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    greedy_rounding: bool = False
    outlier_fraction: float = 0.01   # most salient input channels keep nearest rounding under greedy
    scale_dtype: str = "float16"
    mode: str = field(default="affine", metadata={
        "help": "affine (integer grid) or an MLX microscaled float mode: mxfp4 (E2M1 codes, power-of-two scale "
                "per 32), nvfp4 (E2M1, fp8 E4M3 scale per 16), mxfp8 (E4M3 codes, power-of-two scale per 32); in a "
                "float mode the clip search picks each block's scale byte; --bits / --group-size stay unset"})
    batch_size: int = 8

    def __post_init__(self) -> None:
        from macq.quantizers.rtn import MODES, fix_float_mode

        check(self.mode in MODES, f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode != "affine":
            fix_float_mode(self)
            check(not self.greedy_rounding, f"--greedy-rounding: integer-grid only, not --mode {self.mode}")
        check_bits(self.bits, range(2, 9), self.method)
        check(self.group_size >= 0, f"--group-size {self.group_size}: expected >0 or 0 (per channel)")
        check(self.n_grid >= 1, f"n_grid={self.n_grid}: expected >= 1")
        check(self.clip_grid >= 1, f"clip_grid={self.clip_grid}: expected >= 1")
        check(0.0 < self.max_shrink < 1.0, f"max_shrink={self.max_shrink}: expected in (0, 1)")
        check(self.salience in SALIENCE, f"salience={self.salience!r}: expected one of {', '.join(SALIENCE)}")
        check(0.0 <= self.outlier_fraction < 1.0, f"outlier_fraction={self.outlier_fraction}: expected in [0, 1)")
        check(self.scale_dtype in SCALE_DTYPES, f"--scale-dtype {self.scale_dtype}: expected one of {', '.join(SCALE_DTYPES)}")
        check(self.batch_size >= 1, f"batch_size={self.batch_size}: expected >= 1")
        self.check_stream_options()
        self.check_head_options()




@dataclass
class AWQGPTQConfig(AWQConfig):
    """AWQ scales (and clipping) first, then GPTQ's error-compensating rounding instead of nearest."""

    method = "awq-gptq"
    damp_percent: float = 0.01       # GPTQ's damping (λ = damp_percent · mean diag H); same name as GPTQConfig's
    block_size: int = 128
    act_order: bool = False
    static_grid: bool = field(default=True, metadata={"help": (
        "awq-gptq: GPTQ rounds onto AWQ's clipped per-group grid held fixed (off: each group's grid is re-derived "
        "from its error-updated weights, which undoes part of AWQ's clip)")})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(not self.greedy_rounding, "greedy_rounding applies to nearest rounding, not to awq-gptq")
        check(self.static_grid or not self.act_order, "--act-order needs --static-grid (MLX / Core ML hold no g_idx)")
        check(self.mode == "affine" or not self.act_order,
              f"--act-order: --mode {self.mode} blocks are contiguous input columns")
        check(0 < self.damp_percent < 1, f"--damp-percent {self.damp_percent}: expected a fraction in (0, 1)")

    def gptq_config(self):
        from macq.quantizers.gptq import GPTQConfig

        return GPTQConfig.from_kwargs(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                                      scale_dtype=self.scale_dtype, damp_percent=self.damp_percent,
                                      block_size=self.block_size, act_order=self.act_order,
                                      static_groups=self.static_grid, mse_clip=False, mode=self.mode)


# ---------------------------------------------------------------------------------------------- one linear

def _round_fp_linear(w: torch.Tensor, h: torch.Tensor, cfg: AWQConfig) -> tuple[FPRecord, dict[str, float]]:
    """Float-mode clip search + rounding: each block's scale byte chosen on the layer-output error (MLX's byte
    without ``clip_search``), codes nearest on it; ``awq-gptq`` instead clamps each block to its chosen grid's
    range and lets GPTQ round (MLX's rule on a clamped block gives back a chosen smaller byte; a chosen larger
    one is not kept). MLX's float64 rounding runs on the CPU for a device without float64."""
    if not has_float64(w.device):
        rec, info = _round_fp_linear(w.cpu(), h.cpu(), cfg)
        return record_to(rec, w.device), info
    fmt = fp_format(cfg.mode)
    wg = S.grouped(w, fmt.group_size).double()
    sd = cfg.torch_scale_dtype
    byte, div = S.search_fp_scales(w, h, fmt, sd) if cfg.clip_search else block_scales(wg, fmt, sd)
    info = {"scale_changed": float((byte != block_scales(wg, fmt, sd)[0]).float().mean())}
    if isinstance(cfg, AWQGPTQConfig):
        from macq.quantizers.gptq import gptq_quantize

        top = div * fmt.max_element
        clamped = torch.maximum(torch.minimum(wg, top), -top).reshape(w.shape).to(w.dtype)
        rec, gstats = gptq_quantize(clamped, h, cfg.gptq_config())
        info["gptq_out_err"] = float(gstats["out_err"])
        return rec, info
    codes, _ = round_on(wg, div, fmt)
    return FPRecord(codes=codes.reshape(w.shape), scales=byte[..., 0], mode=cfg.mode), info


def _round_linear(w: torch.Tensor, st: InputStats, x_sal: torch.Tensor, g: int, cfg: AWQConfig
                  ) -> tuple[AffineRecord | FPRecord, dict[str, float]]:
    """Clip search + rounding of one (already scaled) weight ``[out, in]`` -> record, stats."""
    h = st.gram                  # float64: each consumer converts what it uses (8B down_proj: no 0.8 GB copy)
    if cfg.mode != "affine":
        return _round_fp_linear(w, h, cfg)
    clip = S.search_clip(w, h, cfg.bits, g, cfg.symmetric, cfg.torch_scale_dtype, cfg.clip_grid, cfg.max_shrink) \
        if cfg.clip_search else torch.ones(w.shape[0], w.shape[1] // g)
    info = {"clip_mean": float(clip.mean())}
    if isinstance(cfg, AWQGPTQConfig):
        from macq.quantizers.gptq import gptq_quantize

        rec, gstats = gptq_quantize(S.clamp_to_clip(w, clip, g, cfg.symmetric), h, cfg.gptq_config())
        if isinstance(gstats.get("out_err"), (int, float)):
            info["gptq_out_err"] = float(gstats["out_err"])
        return rec, info
    codes, scale, zero, bias = S.nearest_codes(w, cfg.bits, g, cfg.symmetric, cfg.torch_scale_dtype, clip)
    if cfg.greedy_rounding:
        n_protect = int(round(cfg.outlier_fraction * w.shape[1]))
        protect = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
        if n_protect:
            protect[x_sal.topk(n_protect).indices] = True
        before = S.mean_error(w, S.dequant(codes, scale, zero, bias, cfg.bits), st.mean).abs().sum()
        codes = S.greedy_round(w, codes, scale, zero, cfg.bits, st.mean, protect)
        after = S.mean_error(w, S.dequant(codes, scale, zero, bias, cfg.bits), st.mean).abs().sum()
        info["greedy_ratio"] = float(after / before.clamp_min(1e-30))
    sd = cfg.torch_scale_dtype
    rec = AffineRecord(codes=codes.reshape(w.shape), scales=scale.to(sd), bits=cfg.bits, group_size=g,
                       zeros=None if zero is None else zero.to(torch.uint8), biases=None)
    return rec, info


def _salience(st: InputStats, cfg: AWQConfig) -> torch.Tensor:
    return st.abs_mean if cfg.salience == "mean_abs" else st.rms


# ---------------------------------------------------------------------------------------------- one layer

@torch.no_grad()
def quantize_layer(layer: nn.Module, path: str, inputs: LayerInputs, cfg: AWQConfig, spec: ArchSpec,
                   targets: set[str], records: dict[str, AffineRecord | FPRecord], stats: dict[str, dict[str, Any]]) -> None:
    """AWQ one decoder layer in place: search + fold scales, then clip + round every target linear
    (full module paths in ``targets``); fills ``records`` and ``stats``."""
    groups = input_groups(layer, spec.sequence)
    with stage("hessian"):   # E|x|, E[x] and the Gram matrix XᵀX of each input group, one pass
        st = collect_input_stats(layer, inputs, groups, gram=True)
    with stage("search"):
        search_and_fold(layer, path, groups, st, cfg, spec, stats)
    for grp, full, mod in target_linears(layer, path, groups, targets):
        with stage("round"):
            w = get_weight(mod).detach().float()
            rec, info = _round_linear(w, st[grp], _salience(st[grp], cfg), cfg.group_for(full, w.shape[1]), cfg)
            rec.transposed = is_conv1d(mod)
            set_weight(mod, rec.dequantize(torch.float32))
        records[full] = rec
        stats["linears"][full] = info


@torch.no_grad()
def search_and_fold(layer: nn.Module, path: str, groups: list[tuple[str, ...]], st: dict[tuple[str, ...], InputStats],
                    cfg: AWQConfig, spec: ArchSpec, stats: dict[str, dict[str, Any]]) -> None:
    """AWQ's scale search for every foldable mapping of ``layer``, each scale folded in place (``st`` rescaled):
    the float function is unchanged; only the rounding that follows sees the new weights. Shared with methods
    that start from AWQ's scales (``learned``)."""
    group_of = {n: g for g in groups for n in g}
    for m in spec.mappings:
        key = f"{path}.{m.prev}"
        if not can_fold(layer, m):
            stats["scales"][key] = {"folded": False}
            continue
        grp = group_of[m.linears[0]]
        if set(grp) != set(m.linears):
            raise MacqError(f"arch table: mapping {m.prev} -> {m.linears} does not cover the linears sharing its "
                            f"input {grp}; folding would change the model")
        w = torch.cat([get_weight(layer.get_submodule(n)).detach().float() for n in m.linears])
        g = cfg.group_for(m.linears[0], w.shape[1])
        quant = S.fp_fake_quant(fp_format(cfg.mode), cfg.torch_scale_dtype) if cfg.mode != "affine" else None
        s, alpha, err, err0 = S.search_scale(w, st[grp].gram, _salience(st[grp], cfg), cfg.bits, g, cfg.symmetric,
                                             cfg.torch_scale_dtype, cfg.n_grid, cfg.duo_scaling, quant, st[grp].x)
        fold_scales(layer, m, s)
        st[grp].rescale(s)
        stats["scales"][key] = {"folded": True, "alpha": alpha, "error": err, "error_rtn": err0}


def fold_model(model: nn.Module, cfg: AWQConfig, calib_ids: torch.Tensor) -> dict[str, dict[str, Any]]:
    """AWQ's scale search and folding alone, in place, nothing rounded: the float model computes the same
    function (the check that a registry row's mappings are right). Returns the per-mapping scale stats."""
    spec = arch_spec(model).resolved(model.config)
    stats: dict[str, dict[str, Any]] = {"scales": {}}

    def fn(_i: int, path: str, layer: nn.Module, inputs: LayerInputs) -> None:
        groups = input_groups(layer, spec.sequence)
        search_and_fold(layer, path, groups, collect_input_stats(layer, inputs, groups, gram=True), cfg, spec, stats)

    layerwise(model, calib_ids, fn, batch_size=cfg.batch_size, description="awq scales")
    return stats["scales"]


def layer_quantizer(model: nn.Module, cfg: AWQConfig, device: torch.device | None = None) -> LayerJob:
    """AWQ's per-layer step for :func:`layerwise` and the streaming engine (:mod:`macq.quantizers.stream_calib`,
    which materialises one layer of a meta skeleton at a time: ``model`` is only read for its module names
    and config). Runs on ``device`` (CPU by default): statistics, searches and rounding where the layer is."""
    spec = arch_spec(model).resolved(model.config)
    if isinstance(cfg, AWQGPTQConfig):
        try:
            cfg.gptq_config()
        except ImportError:
            raise MacqError("awq-gptq needs macq.quantizers.gptq, which is not available") from None
    targets = set(quantizable_modules(model, False, False, tuple(cfg.skip)))
    records: dict[str, AffineRecord | FPRecord] = {}
    stats: dict[str, dict[str, Any]] = {"scales": {}, "linears": {}}

    def fn(_i: int, path: str, layer: nn.Module, inputs: LayerInputs) -> None:
        quantize_layer(layer, path, inputs, cfg, spec, targets, records, stats)

    return LayerJob(fn, records, stats, device or torch.device("cpu"), cfg.batch_size, stats_in_manifest=True)


def quantize_model(model: nn.Module, cfg: AWQConfig, calib_ids: torch.Tensor, progress: bool = False,
                   source: str = ""):
    """AWQ (or AWQ→GPTQ for :class:`AWQGPTQConfig`) the decoder linears of ``model`` in place.

    Returns a :class:`~macq.qmodel.QuantizedModel` capturing the folded float tensors and the records;
    ``method["stats"]["scales"]`` holds the chosen α and output errors (AWQ vs α=0, i.e. nearest) per
    mapping, keyed by its producer; ``method["stats"]["linears"]`` the mean clip (and greedy error ratio).
    """
    from macq.qmodel import QuantizedModel

    check_model_inputs("awq", cfg, AWQConfig, calib_ids)
    job = layer_quantizer(model, cfg, resolve_device(cfg.device))
    run_job(model, calib_ids, job, progress, cfg.method)
    method = cfg.to_dict()
    method["stats"] = job.stats
    return QuantizedModel.from_model(model, job.records, method=method, source=source)

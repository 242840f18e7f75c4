"""Mixed precision under a bits-per-weight budget: sensitivities → allocation → per-layer rounding.

1. Candidate formats come from the target runtime (:mod:`macq.quantizers.formats`): only what its
   exporter can write, each costed with the exact record storage rule.
2. Each allocation unit (a linear, an attention/MLP block, or a decoder layer) gets an error per format:
   the Fisher-weighted error (default; one backward per calibration sequence), the Hessian proxy (one
   calibration pass; it sums layer-output errors as if equally harmful at every depth, and on SmolLM2 its
   allocations lost to uniform formats: see scripts/benchmarks/bench_mixed.py) or the KL of the next-token distribution with that unit
   alone quantized (one forward per unit per format) (:mod:`macq.quantizers.sensitivity`).
3. :func:`macq.quantizers.allocate.allocate` picks one format per unit minimising the summed error with
   the average bpw at most the target (met to 0.01 bpw from below when reachable; a target below the
   cheapest allocation is refused). Or a fixed llama.cpp-style recipe (:mod:`macq.quantizers.recipes`)
   replaces steps 2–3.
4. Every module is rounded in its format: RTN, or GPTQ through the layerwise engine (affine and float formats;
   palettes use k-means, modules outside the decoder stack use RTN). Bias-form formats store GPTQ's
   zero-points as fp16 biases (MLX's form), the form their cost was computed for.

The returned model's ``method`` records the per-module format, the achieved and target bpw, and notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from macq.arch import arch_spec, decoder_layers
from macq.device import resolve_device
from macq.errors import MacqError
from macq.models import get_weight, is_conv1d, quantizable_modules, set_weight
from macq.progress import stage
from macq.quantizers.activations import StreamOptions
from macq.quantizers.allocate import Allocation, allocate
from macq.quantizers.base import QuantConfig, check
from macq.quantizers.calibration import model_on
from macq.quantizers.formats import TARGET_FORMATS, Format, candidate_formats, to_bias_form
from macq.quantizers.sensitivity import (
    GRANULARITIES,
    SensitivityTable,
    fisher_sensitivity,
    kl_sensitivity,
    make_units,
    proxy_sensitivity,
)
from macq.record import Record, record_to


@dataclass
class MixedConfig(StreamOptions, QuantConfig):
    method = "mixed"
    target_bpw: float = 4.0
    target: str = "mlx"                 # mlx | coreml | any: which formats are candidates
    base_method: str = "rtn"            # rounding once formats are chosen: rtn | gptq
    # fisher (default: measured best, see scripts/benchmarks/bench_mixed.py) | proxy (Hessian-weighted layer-output error,
    # which ranks layers poorly across depth) | kl (one forward per unit x format)
    sensitivity: str = "fisher"
    recipe: str | None = None           # a fixed recipe name instead of the allocator (target_bpw unused)
    formats: tuple[str, ...] = ()       # override: subset of the target's formats by name (e.g. a4g64b)
    granularity: str = "module"         # allocation unit: module | sublayer | layer
    resolution: float = 0.005           # most bpw the allocator's cost rounding may leave unspent
    kl_samples: int = 4                 # calibration sequences used by KL sensitivity (first N)
    batch_size: int = 8
    damp_percent: float = 0.01          # GPTQ damping

    def __post_init__(self) -> None:
        check(self.target in TARGET_FORMATS, f"--target {self.target!r}: expected one of {', '.join(TARGET_FORMATS)}")
        check(self.base_method in ("rtn", "gptq"), f"--base-method {self.base_method!r}: expected rtn or gptq")
        check(self.sensitivity in ("proxy", "fisher", "kl"),
              f"--sensitivity {self.sensitivity!r}: expected proxy, fisher or kl")
        check(self.granularity in GRANULARITIES, f"--granularity {self.granularity!r}: expected one of "
              f"{', '.join(GRANULARITIES)}")
        check(self.target_bpw > 0, f"--target-bpw {self.target_bpw}: expected > 0")
        check(self.kl_samples >= 1 and self.batch_size >= 1, "--kl-samples and --batch-size must be >= 1")
        self.formats = tuple(f.name if isinstance(f, Format) else str(f) for f in self.formats)
        if self.recipe is not None:
            from macq.quantizers.recipes import get_recipe
            get_recipe(self.recipe)
        candidate_formats(self.target, self.formats)  # validates names against the target
        self.check_stream_options()

    def stream_refusal(self) -> str:
        """Streamed: the Hessian proxy (one float pass, layer by layer) or a fixed recipe decide the formats; the
        Fisher diagonal comes from a streamed backward pass (:mod:`macq.quantizers.stream_grad`); the KL
        sensitivities need the logits of the whole model with each unit quantized, and the embedding / lm_head's
        errors need the whole model's token statistics and final hidden states."""
        if self.include_embeddings or self.include_lm_head:
            flag = "--include-embeddings" if self.include_embeddings else "--include-lm-head"
            return (f"mixed {flag}: the embedding / lm_head are sized on the whole model's statistics; "
                    "drop it to stream the decoder linears, or --no-stream")
        if self.recipe is None and self.sensitivity == "kl":
            return ("mixed --sensitivity kl needs the whole model's logits; pass --sensitivity fisher or proxy "
                    "(or a --recipe) to stream, or --no-stream")
        return ""

    def candidate_formats(self) -> list[Format]:
        return candidate_formats(self.target, self.formats)


def _modules(model: nn.Module, cfg: MixedConfig) -> dict[str, nn.Module]:
    mods = quantizable_modules(model, cfg.include_embeddings, cfg.include_lm_head, tuple(cfg.skip))
    if not mods:
        raise MacqError("mixed: no modules selected to quantize")
    return mods


def sensitivity_table(model: nn.Module, cfg: MixedConfig, calib_ids: torch.Tensor,
                      progress: bool = False) -> SensitivityTable:
    """Per-unit, per-format errors and costs for ``cfg`` (reusable across targets: see :func:`plan`)."""
    mods = _modules(model, cfg)
    fmts = cfg.candidate_formats()
    units = make_units(list(mods), cfg.granularity, arch_spec(model).layers)
    device = resolve_device(cfg.device)
    if cfg.sensitivity == "kl":
        return kl_sensitivity(model, calib_ids[: cfg.kl_samples], fmts, mods, units,
                              batch_size=min(cfg.batch_size, cfg.kl_samples), device=device, progress=progress)
    if cfg.sensitivity == "fisher":
        table = fisher_sensitivity(model, calib_ids, fmts, mods, device, progress)
    else:
        table = proxy_sensitivity(model, calib_ids, fmts, mods, cfg.batch_size, device, progress)
    return table if cfg.granularity == "module" else table.grouped(units)


def plan(table: SensitivityTable, target_bpw: float, resolution: float = 0.005
         ) -> tuple[dict[str, Format], Allocation]:
    """Allocate on a sensitivity table: the format of every module path, and the allocation itself."""
    alloc = allocate(table.errors, table.bpw, table.sizes, target_bpw, resolution)
    assignment = {m: table.formats[j] for u, j in zip(table.units, alloc.choice) for m in table.members[u]}
    return assignment, alloc


def recipe_plan(model: nn.Module, cfg: MixedConfig) -> dict[str, Format]:
    from macq.quantizers.recipes import recipe_assignment

    spec = arch_spec(model)
    mods = _modules(model, cfg)
    assignment = recipe_assignment(cfg.recipe, list(mods), spec.layers, len(decoder_layers(model)))
    allowed = set(TARGET_FORMATS[cfg.target])
    bad = sorted({f.name for f in assignment.values() if f not in allowed})
    if bad:
        raise MacqError(f"--recipe {cfg.recipe}: formats {', '.join(bad)} are not supported by target {cfg.target!r}")
    for m, f in assignment.items():
        if not f.fits(tuple(get_weight(mods[m]).shape)):
            raise MacqError(f"--recipe {cfg.recipe}: {f.name} does not fit {m} {tuple(get_weight(mods[m]).shape)}")
    return assignment


def _gptq_records(model: nn.Module, assignment: dict[str, Format], mods: dict[str, nn.Module],
                  calib_ids: torch.Tensor, cfg: MixedConfig, progress: bool) -> dict[str, Record]:
    """GPTQ each decoder linear at its own format, true-sequentially (the model is modified in place)."""
    from macq.quantizers.calibration import layerwise

    device = resolve_device(cfg.device)
    records: dict[str, Record] = {}
    per_layer = _gptq_layer_step(arch_spec(model), assignment, cfg, device, records)
    layerwise(model, calib_ids, per_layer, batch_size=cfg.batch_size, device=device, progress=progress,
              description="mixed gptq")
    for m in assignment:
        if m not in records:            # embeddings / lm_head: outside the layerwise engine
            records[m] = _rtn_record(mods[m], assignment[m])
    missing = set(assignment) - set(records)
    if missing:
        raise MacqError(f"mixed gptq: {sorted(missing)[0]} is not in the architecture's linear sequence")
    return records


def _gptq_layer_step(spec: Any, assignment: dict[str, Format], cfg: MixedConfig, device: torch.device,
                     records: dict[str, Record]):
    """One decoder layer's linears, each GPTQ'd at its own format (palettes: k-means), true-sequentially."""
    from macq.quantizers.gptq import GPTQConfig, gptq_quantize
    from macq.quantizers.hessian import collect_hessians

    def per_layer(_i: int, path: str, layer: nn.Module, inputs) -> None:
        for grp in spec.sequence:
            grp = [n for n in grp if f"{path}.{n}" in assignment]
            if not grp:
                continue
            H = None
            for n in grp:
                fmt, mod = assignment[f"{path}.{n}"], layer.get_submodule(n)
                w = get_weight(mod).detach().float()
                if fmt.kind in ("affine", "fp"):
                    if H is None:
                        with stage("hessian"):
                            H = collect_hessians(layer, inputs, [grp[0]], device, stop_early=True)[grp[0]]
                    gcfg = (GPTQConfig(mode=fmt.mode, damp_percent=cfg.damp_percent) if fmt.kind == "fp" else
                            GPTQConfig(bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric,
                                       damp_percent=cfg.damp_percent))
                    with stage("round"):
                        rec = gptq_quantize(w, H, gcfg)[0]
                    rec = to_bias_form(rec) if fmt.kind == "affine" and fmt.zero == "bias" else rec
                else:
                    with stage("round"):
                        rec = fmt.quantize(w)
                rec.transposed = is_conv1d(mod)
                set_weight(mod, rec.dequantize())
                records[f"{path}.{n}"] = rec

    return per_layer


def layer_quantizer(model: nn.Module, cfg: MixedConfig, device: torch.device | None = None):
    """Mixed precision on the streaming engine (``model``: a meta skeleton, read for names and shapes), in two
    passes: the first streams the float model and measures every decoder linear's error at every format (the
    Hessian proxy, :func:`~macq.quantizers.sensitivity.proxy_layer_step`, the in-memory pass's own step; or the
    Fisher-weighted one, from a streamed backward pass before it); between them
    the allocation runs on the whole table (a fixed ``--recipe`` needs no first pass); the second rounds each
    linear in its format (RTN, or GPTQ true-sequentially on the quantized model's inputs, as in memory)."""
    from macq.quantizers.calibration import LayerJob
    from macq.quantizers.sensitivity import proxy_layer_step, proxy_table

    check(not cfg.stream_refusal(), f"--stream: {cfg.stream_refusal()}")
    spec = arch_spec(model)
    mods = _modules(model, cfg)
    dev = device if device is not None else resolve_device(cfg.device)
    records: dict[str, Record] = {}
    errs: dict[str, list[float]] = {}
    state: dict[str, Any] = {"assignment": None, "info": {}, "notes": []}
    counts = {"bits": 0, "weights": 0}

    def decide() -> None:
        if cfg.recipe is not None:
            assignment = recipe_plan(model, cfg)
            state["notes"].append(f"fixed recipe {cfg.recipe}: target_bpw not used")
        else:
            table = proxy_table(mods, cfg.candidate_formats(), errs, cfg.sensitivity)
            if cfg.granularity != "module":
                table = table.grouped(make_units(list(mods), cfg.granularity, spec.layers))
            assignment, alloc = plan(table, cfg.target_bpw, cfg.resolution)
            state["notes"] += table.notes + alloc.notes
            state["info"] = {"allocated_bpw": alloc.bpw, "floor_bpw": alloc.floor_bpw,
                             "ceiling_bpw": alloc.ceiling_bpw, "total_error": alloc.error}
        if cfg.base_method == "gptq" and any(f.kind == "lut" for f in assignment.values()):
            state["notes"].append("palettized (lut) modules use k-means, not GPTQ")
        state["assignment"] = assignment
        state["gptq"] = _gptq_layer_step(spec, assignment, cfg, dev, records)

    def fn(i: int, path: str, layer: nn.Module, inputs) -> None:
        mine = [m for m in state["assignment"] if m.startswith(path + ".")]
        if cfg.base_method == "gptq":
            state["gptq"](i, path, layer, inputs)
        else:
            with stage("round"):
                for m in mine:
                    records[m] = _rtn_record(layer.get_submodule(m[len(path) + 1:]), state["assignment"][m])
        missing = [m for m in mine if m not in records]
        if missing:
            raise MacqError(f"mixed gptq: {missing[0]} is not in the architecture's linear sequence")
        for m in mine:
            counts["bits"] += records[m].storage_bits()
            counts["weights"] += records[m].shape[0] * records[m].shape[1]

    def method_info() -> dict[str, Any]:
        info = state["info"]
        achieved = counts["bits"] / counts["weights"] if counts["weights"] else 16.0
        if "allocated_bpw" in info and abs(achieved - info["allocated_bpw"]) > 1e-9:
            raise MacqError(f"mixed: records store {achieved:.6f} bpw but the allocation costed "
                            f"{info['allocated_bpw']:.6f} (format cost rule out of step with the records)")
        return {**info, "achieved_bpw": achieved, "notes": state["notes"],
                "allocation": {m: f.name for m, f in state["assignment"].items()}}

    if cfg.recipe is not None:        # shapes only: a recipe that does not fit fails before any weight is read
        decide()
        return LayerJob(fn, records, {}, dev, cfg.batch_size, method_info=method_info)
    if cfg.sensitivity == "fisher":
        from macq.quantizers.sensitivity import fisher_layer_step
        from macq.quantizers.stream_grad import FisherStore, stream_fisher

        fisher = FisherStore()

        def backward(stream, calib_ids: torch.Tensor) -> dict[str, Record]:
            stream_fisher(stream, calib_ids, set(mods), set(), fisher)
            return {}

        prepass = fisher_layer_step(set(mods), cfg.candidate_formats(), fisher, errs)
        return LayerJob(fn, records, {}, dev, cfg.batch_size, prepass=prepass, after_prepass=decide,
                        method_info=method_info, backward=backward)
    prepass = proxy_layer_step(spec, set(mods), cfg.candidate_formats(), dev, errs)
    return LayerJob(fn, records, {}, dev, cfg.batch_size, prepass=prepass, after_prepass=decide,
                    method_info=method_info)


def _rtn_record(mod: nn.Module, fmt: Format) -> Record:
    rec = fmt.quantize(get_weight(mod).detach().float())
    rec.transposed = is_conv1d(mod)
    return rec


def quantize_assignment(model: nn.Module, assignment: dict[str, Format], cfg: MixedConfig,
                        calib_ids: torch.Tensor | None, progress: bool = False) -> dict[str, Record]:
    """Round every module in its assigned format with ``cfg.base_method``."""
    mods = _modules(model, cfg)
    if cfg.base_method == "gptq":
        if calib_ids is None:
            raise MacqError("mixed: --base-method gptq needs calibration data")
        return _gptq_records(model, assignment, mods, calib_ids, cfg, progress)
    return {m: _rtn_record(mods[m], f) for m, f in assignment.items()}


def quantize_model(model: nn.Module, cfg: MixedConfig, calib_ids: torch.Tensor | None, progress: bool = False,
                   source: str = "", table: SensitivityTable | None = None):
    """Mixed-precision quantization of ``model`` (modified in place by GPTQ) → QuantizedModel.

    ``table`` reuses a sensitivity table computed earlier with the same model, formats and granularity.
    """
    from macq.qmodel import QuantizedModel

    notes: list[str] = []
    info: dict[str, Any] = {}
    device = resolve_device(cfg.device)
    if cfg.recipe is not None:
        assignment = recipe_plan(model, cfg)
        notes.append(f"fixed recipe {cfg.recipe}: target_bpw not used")
    else:
        if table is None:
            if calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0:
                raise MacqError("mixed: calibration ids must be a non-empty [n_samples, seq_len] tensor")
            with model_on(model, device):
                table = sensitivity_table(model, cfg, calib_ids, progress)
        assignment, alloc = plan(table, cfg.target_bpw, cfg.resolution)
        notes += table.notes + alloc.notes
        info = {"allocated_bpw": alloc.bpw, "floor_bpw": alloc.floor_bpw, "ceiling_bpw": alloc.ceiling_bpw,
                "total_error": alloc.error}
    if cfg.base_method == "gptq" and any(f.kind == "lut" for f in assignment.values()):
        notes.append("palettized (lut) modules use k-means, not GPTQ")
    with model_on(model, device):   # the in-memory path: the whole model on the device
        records = quantize_assignment(model, assignment, cfg, calib_ids, progress)
    records = {name: record_to(rec, "cpu") for name, rec in records.items()}
    method = cfg.to_dict()
    qm = QuantizedModel.from_model(model, records, method=method, source=source)
    achieved = qm.bits_per_weight()
    if "allocated_bpw" in info and abs(achieved - info["allocated_bpw"]) > 1e-9:
        raise MacqError(f"mixed: records store {achieved:.6f} bpw but the allocation costed "
                        f"{info['allocated_bpw']:.6f} (format cost rule out of step with the records)")
    method.update(info, achieved_bpw=achieved, notes=notes, allocation={m: f.name for m, f in assignment.items()})
    qm.method = method
    return qm


def allocation_summary(assignment: dict[str, str] | dict[str, Format]) -> dict[str, int]:
    """How many modules got each format (for tables and logs)."""
    out: dict[str, int] = {}
    for f in assignment.values():
        name = f.name if isinstance(f, Format) else f
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))

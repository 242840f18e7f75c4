"""Trace → ``ct.convert`` (ML Program, iOS18 / macOS15, fp16 compute) → record-weights pass → atomic save.

The torch model carries the *dequantized* weights (``qm.to_torch``), so the traced graph is an ordinary
fp16 program; :mod:`converters.weights` then swaps every quantized weight const for a constexpr op
built from its record. coremltools never re-quantizes anything.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from converters.mil_io import quiet_ct
from converters.wrapper import window_masks
from macq.arch import arch_spec
from macq.atomic import atomic_dir
from macq.errors import MacqError

COMPUTE_UNITS = ("ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY")


@dataclass
class ExportResult:
    path: Path
    bytes_on_disk: int
    bits_per_weight: float            # over the compressed (constexpr) weights, as stored in the file
    ops: dict[str, int]               # MIL op histogram of the main function
    ane_report: list[str]
    notes: list[str] = field(default_factory=list)
    chunks: list[dict] = field(default_factory=list)  # ANE export: one row per package (path, bytes, findings)


_quiet_ct = quiet_ct  # the name other converters modules used before mil_io existed


def ct_inputs_states(wrapper, fixed_shapes: bool):
    """Input / state / output types for ``ct.convert`` matching :class:`CoreMLLM`."""
    ct = _quiet_ct()
    ctx = wrapper.context
    if fixed_shapes:
        q, kl = 1, ctx
    else:
        q, kl = ct.RangeDim(1, ctx, default=1), ct.RangeDim(1, ctx, default=1)
    inputs = [ct.TensorType("input_ids", shape=(1, q), dtype=np.int32),
              ct.TensorType("causal_mask", shape=(1, 1, q, kl), dtype=np.float16)]
    if fixed_shapes:
        inputs.append(ct.TensorType("position", shape=(1,), dtype=np.int32))
    outputs = [ct.TensorType("logits", dtype=np.float16)]
    states = []
    if wrapper.stateful:
        states = [ct.StateType(ct.TensorType(shape=wrapper.shape, dtype=np.float16), name=n)
                  for n in ("key_cache", "value_cache")]
    else:
        inputs += [ct.TensorType(n, shape=wrapper.shape, dtype=np.float16) for n in ("key_cache_in", "value_cache_in")]
        outputs += [ct.TensorType(n, dtype=np.float16) for n in ("key_cache_out", "value_cache_out")]
    return inputs, states, outputs


def example_inputs(wrapper, fixed_shapes: bool) -> tuple[torch.Tensor, ...]:
    """Trace inputs: 2 queries over 3 keys (flexible) so that no size is specialised to 1."""
    from converters.wrapper import causal_mask

    if fixed_shapes:
        ex = [torch.zeros(1, 1, dtype=torch.int32),
              torch.from_numpy(causal_mask(1, 0, wrapper.context, np.float32)), torch.zeros(1, dtype=torch.int32)]
    else:
        ex = [torch.zeros(1, 2, dtype=torch.int32), torch.from_numpy(causal_mask(2, 1, None, np.float32))]
    if not wrapper.stateful:
        ex += [torch.zeros(wrapper.shape), torch.zeros(wrapper.shape)]
    return tuple(ex)


def convert_torch(model: torch.nn.Module, context: int, stateful: bool, fixed_shapes: bool, compute_units: str):
    """Trace the wrapped model and convert it; returns the in-memory MLModel (not loaded)."""
    from converters.wrapper import CoreMLLM, prepare_model

    ct = _quiet_ct()
    wrapper = CoreMLLM(prepare_model(model), context, stateful, fixed_shapes).eval()
    ex = example_inputs(wrapper, fixed_shapes)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, ex, check_trace=False)
        inputs, states, outputs = ct_inputs_states(wrapper, fixed_shapes)
        return ct.convert(traced, inputs=inputs, states=states or None, outputs=outputs,
                          minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                          compute_units=getattr(ct.ComputeUnit, compute_units), convert_to="mlprogram",
                          skip_model_load=True)


def atomic_save(mlmodel, out_path: Path, force: bool) -> Path:
    """Save into a temp dir beside ``out_path`` and rename: a failure never leaves a half-written package."""
    if out_path.exists() and not force:
        raise MacqError(f"output: {out_path} exists (pass force=True to overwrite)")
    with atomic_dir(out_path) as tmp:
        mlmodel.save(str(tmp))
    return out_path


# Core ML model definitions by the name a registry row gives in ``ArchSpec.coreml``: each turns the torch model
# carrying the dequantized weights into an ML Program. "hf_trace" traces the HF model inside CoreMLLM.
MODEL_DEFINITIONS = {
    "hf_trace": lambda model, context, stateful, fixed_shapes, compute_units:
        convert_torch(model, context, stateful, fixed_shapes, compute_units),
}


def model_definition(qm):
    """The converter for ``qm``'s family, from its registry row; one line when there is none."""
    name = arch_spec(qm.config.model_type).coreml_support(qm.config)
    try:
        return MODEL_DEFINITIONS[name]
    except KeyError:
        raise MacqError(f"model_type {qm.config.model_type!r}: Core ML model definition {name!r} is not registered; "
                        f"known: {', '.join(MODEL_DEFINITIONS)}") from None


def _check_args(qm, out_path: Path, context: int, compute_units: str, force: bool) -> None:
    if out_path.suffix != ".mlpackage":
        raise MacqError(f"output: {out_path} must end in .mlpackage")
    if out_path.exists() and not force:
        raise MacqError(f"output: {out_path} exists (pass force=True to overwrite)")
    if compute_units not in COMPUTE_UNITS:
        raise MacqError(f"compute_units={compute_units!r}: expected one of {', '.join(COMPUTE_UNITS)}")
    spec = arch_spec(qm.config.model_type)
    model_definition(qm)                                # one line naming the family when it has no definition
    window_masks(spec, qm.config)                       # refuses window layouts the wrapper cannot mask
    max_pos = spec.max_positions(qm.config)
    if not isinstance(context, int) or context < 2 or (max_pos and context > max_pos):
        raise MacqError(f"context={context}: expected an int in [2, {max_pos}]")
    if qm.act_quant:
        raise MacqError("activation quantization (e.g. SmoothQuant W8A8) cannot be expressed in a Core ML weight-only export")


GRAPHS = ("ane", "hf")


def export_coreml_hf(qm, out_path: str | os.PathLike, context: int = 512, stateful: bool = True,
                     fixed_shapes: bool = False, compute_units: str = "ALL", force: bool = False,
                     allow_fallback: bool = False) -> ExportResult:
    """``graph="hf"``: transformers' model traced (flexible shapes unless ``fixed_shapes``; ``stateful=False``
    for KV-in/KV-out), one function, record-exact weights placed by :mod:`converters.weights`.
    ``allow_fallback``: store inexact-but-close forms (bias-form affine with non-integer −b/s, non-fp16
    scales) instead of raising; each such layer is named in ``notes``."""
    from converters.inspect import inspect_mlpackage
    from converters.weights import apply_records, plan_layouts

    out_path = Path(out_path)
    _check_args(qm, out_path, context, compute_units, force)
    layouts, notes = plan_layouts(qm.records, allow_fallback)  # fails fast, before the slow conversion
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = qm.to_torch(torch.float32)
    mlmodel = model_definition(qm)(model, context, stateful, fixed_shapes, compute_units)
    mlmodel, _ = apply_records(mlmodel, qm.records, layouts=layouts)
    _stamp_metadata(mlmodel, qm)
    atomic_save(mlmodel, out_path, force)
    info = inspect_mlpackage(out_path)
    return ExportResult(path=out_path, bytes_on_disk=info["bytes_on_disk"], bits_per_weight=info["bits_per_weight"],
                        ops=info["ops"], ane_report=info["ane_report"], notes=notes)


def provenance(qm) -> dict[str, str]:
    """Provenance in the package itself: where the weights came from and how they were quantized, so
    ``macq eval FILE.mlpackage`` can find the tokenizer and a reader can tell what the file holds."""
    import json

    return {"macq.source": str(qm.source or ""), "macq.method": json.dumps(qm.method, default=str),
            "macq.bits_per_weight": f"{qm.bits_per_weight():.4f}"}


def _stamp_metadata(mlmodel, qm) -> None:
    mlmodel.user_defined_metadata.update(provenance(qm))
    mlmodel.short_description = f"macq export ({qm.method.get('method', '?')}) of {qm.source or 'a causal LM'}"

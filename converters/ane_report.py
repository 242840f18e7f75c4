"""What in a saved model is likely to keep work off the Apple Neural Engine, and compute-unit advice.

This is a static reading of the file, not a measurement: only Core ML on a Mac/iPhone decides where an
op runs (use ``MLComputePlan`` on macOS for the truth). The rules below are assumptions collected from
public sources and stated as such:

* The ANE computes in fp16 only; fp32 tensors run on CPU/GPU (Apple, "Deploying Transformers on the
  Apple Neural Engine", 2022).
* Flexible ``RangeDim`` inputs: the ANE compiles for static shapes; coremltools' "Flexible Input Shapes"
  guide says only enumerated shapes may be ANE-eligible, range shapes generally are not.
* Ops with no ANE kernel (community list hollance/neural-engine "unsupported layers", plus dynamic-shape
  ops): gather with a large table, shape/range/fill on dynamic sizes, cumsum, topk/argsort, scatter,
  control flow. The set is an approximation and changes with OS versions.
* Weight formats (coremltools "Optimization Overview → Performance"): per-channel int8/int4 and
  (grouped-channel) palettization are what the ANE is documented to accelerate on iOS18/macOS15;
  per-block int4 scales and LUT+scale chains are documented for GPU speed-ups, so they may be
  decompressed up front (memory win only) or leave the ANE.
* Cache tensors whose last dims are not multiples of 32 may be padded by the ANE (assumption from the
  ANE's 64-byte row alignment, hollance/neural-engine); harmless but wastes memory.
"""

from __future__ import annotations

from pathlib import Path

NOT_ON_ANE = {"shape", "range_1d", "fill", "cumsum", "topk", "argsort", "scatter", "scatter_nd",
              "scatter_along_axis", "while_loop", "cond", "non_maximum_suppression", "random_uniform",
              "random_normal", "band_part"}
# Largest dimension assumed to fit the ANE: ANEMLL splits LM heads / embeddings into parts below it and
# hollance/neural-engine reports larger tensors falling back to CPU. An assumption, stated as one.
MAX_ANE_DIM = 16384
LARGE_GATHER = MAX_ANE_DIM  # rows; embedding tables this large usually stay on CPU


def _flexible_inputs(spec) -> list[str]:
    descs = list(spec.description.functions) or [spec.description]
    return sorted({i.name for d in descs for i in d.input if i.type.WhichOneof("Type") == "multiArrayType"
                   and i.type.multiArrayType.WhichOneof("ShapeFlexibility") == "shapeRange"})


def _all_ops(prog) -> list:
    return [op for f in prog.functions.values() for op in f.operations]


def _oversize(ops) -> list[str]:
    """Non-const tensors (and tensors a compute op reads as its weight) with a dimension over MAX_ANE_DIM."""
    from coremltools.converters.mil.mil import types

    names = set()
    for op in ops:
        if op.op_type == "const":
            continue
        for v in op.outputs:
            if types.is_tensor(v.sym_type) and any(isinstance(d, int) and d > MAX_ANE_DIM for d in v.shape):
                names.add(f"{op.op_type}:{v.name}{list(v.shape)}")
        for v in op.inputs.values():
            if getattr(v, "op", None) is not None and v.op.op_type == "const" and types.is_tensor(v.sym_type) \
                    and any(isinstance(d, int) and d > MAX_ANE_DIM for d in v.shape):
                names.add(f"{op.op_type}(const {v.name}{list(v.shape)})")
    return sorted(names)


def ane_findings(prog, spec) -> list[str]:
    """The gate: findings of the static rule set (flexible shapes, ops without an ANE kernel, fp32 tensors,
    tensors over the ANE's dimension limit) over every function of the program. Empty = ANE-clean."""
    from coremltools.converters.mil.mil import types

    out: list[str] = []
    ops = _all_ops(prog)
    flexible = _flexible_inputs(spec)
    if flexible:
        out.append(f"flexible (RangeDim) inputs {flexible}: the ANE wants static shapes; expect CPU/GPU unless "
                   "exported with fixed shapes (the default ANE graph)")
    bad = sorted({op.op_type for op in ops if op.op_type in NOT_ON_ANE})
    if bad:
        out.append(f"ops without an ANE kernel (assumed list): {', '.join(bad)}")
    big_gather = sorted({op.name for op in ops if op.op_type == "gather" and op.x.shape and isinstance(op.x.shape[0], int)
                         and op.x.shape[0] >= LARGE_GATHER})
    if big_gather:
        out.append(f"{len(big_gather)} gather(s) over ≥{LARGE_GATHER} rows (embedding): usually CPU")
    fp32 = sorted({op.op_type for op in ops if op.op_type not in ("const",) and not op.op_type.startswith("constexpr")
                   for v in op.outputs if types.is_tensor(v.sym_type) and v.dtype == types.fp32})
    if fp32:
        out.append(f"fp32 tensors produced by: {', '.join(fp32)} (ANE is fp16-only)")
    big = _oversize(ops)
    if big:
        out.append(f"{len(big)} tensor(s) with a dimension over {MAX_ANE_DIM} (assumed ANE limit): "
                   f"{', '.join(big[:3])}{' …' if len(big) > 3 else ''}")
    return out


def ane_notes(prog, spec) -> list[str]:
    """Advisories that do not fail the gate: weight formats documented for the GPU, padded state rows."""
    from coremltools.converters.mil.mil import types

    out: list[str] = []
    blockwise_int4 = 0
    lut_scale = 0
    from converters.mil_io import main_function

    for op in prog.functions[main_function(prog, spec)].operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            data, scale = op.data, op.scale
            if data.op is not None and data.op.op_type.startswith("constexpr"):
                lut_scale += 1
            elif types.builtin_to_string(data.dtype) in ("int4", "uint4") and scale.shape[1] > 1:
                blockwise_int4 += 1
    if blockwise_int4:
        out.append(f"{blockwise_int4} weight(s) int4 with per-block scales: documented GPU format; on the ANE "
                   "likely decompressed at load (memory win only) or moved off the ANE")
    if lut_scale:
        out.append(f"{lut_scale} weight(s) LUT + per-block/channel scale chain: GPU-oriented format, same caveat")
    dense_sparse = sum(1 for op in prog.functions[main_function(prog, spec)].operations if op.op_type == "add"
                       and all(v.op is not None and v.op.op_type.startswith("constexpr") for v in (op.x, op.y)))
    if dense_sparse:
        out.append(f"{dense_sparse} weight(s) LUT + sparse fp16 outliers summed by a runtime add: not a compile-time "
                   "constant, so Core ML may compute the add per call (or fold it at load); unmeasured on device")
    descs = list(spec.description.functions[:1]) or [spec.description]
    for s in descs[0].state:
        shape = list(s.type.stateType.arrayType.shape)
        if shape and (shape[-1] % 32 or (len(shape) > 1 and shape[-2] % 32)):
            out.append(f"state {s.name} {shape}: last dims not multiples of 32 (ANE may pad)")
    return out


def advice(findings: list[str]) -> str:
    if not findings:
        return "advice: compute_units=CPU_AND_NE (graph looks ANE-eligible); benchmark ALL vs CPU_AND_NE on device"
    return ("advice: compute_units=ALL (Core ML will split work; the GPU takes what the ANE cannot); "
            "for the ANE use the default ANE graph (fixed shapes) and per-channel/grouped-LUT weights")


def ane_report(path: str | Path, loaded: tuple | None = None) -> list[str]:
    """Human-readable lines: findings (each an assumption, see module doc) and compute-unit advice.

    ``loaded``: an already loaded ``(program, spec)`` of ``path`` (saves a second parse)."""
    from converters.mil_io import load_program

    prog, spec = loaded if loaded is not None else load_program(path)
    lines = ane_findings(prog, spec)
    adv = advice(lines)
    return lines + [f"note: {n}" for n in ane_notes(prog, spec)] + [adv]

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
* State tensors (the KV cache) whose last two dims are not multiples of 32: coremltools #2631 reports
  such states failing on the ANE (the ANE's 64-byte row alignment, hollance/neural-engine). A finding.
* State writes at runtime offsets (``slice_update`` / ``scatter`` whose begin or indices are computed):
  the ANE compiler rejects them and the stateful function falls back to the CPU (coremltools #2553, #2600;
  coreai-torch #6 "ANECompiler crash if slice_update indices are runtime values"). A finding.
* Weight files over 1 GiB (:data:`MAX_WEIGHT_FILE`): iOS refuses to map larger weight files and the ANE's
  limit is 2 GiB (coremltools PR #2593; ANEMLL chunks for it). A finding.
* Constants that are not fp16-safe: non-finite fp16/fp32 constants, and fp16 activation constants
  (not weights) that are subnormal, which the ANE may flush to zero (Apple, "Deploying Transformers on the
  ANE": eps 1e-7 → fp16-safe values). A finding.
* A multifunction package (prefill + decode) whose functions hold separate copies of the same weight blob:
  the file should hold one copy, both functions pointing at the same offsets. A finding.
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
STATE_ALIGN = 32            # state dims (coremltools #2631)
MAX_WEIGHT_FILE = 1 << 30   # bytes per weight file (iOS; the ANE's own limit is 2 GiB, coremltools PR #2593)
DYNAMIC_WRITES = {"slice_update": ("begin", "end"), "scatter": ("indices",), "scatter_nd": ("indices",),
                  "scatter_along_axis": ("indices",)}
FP16_TINY = 2.0 ** -14      # smallest normal fp16


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


def _state_findings(spec) -> list[str]:
    descs = list(spec.description.functions) or [spec.description]
    bad = sorted({f"{s.name}{list(s.type.stateType.arrayType.shape)}" for d in descs for s in d.state
                  if any(int(x) % STATE_ALIGN for x in list(s.type.stateType.arrayType.shape)[-2:])})
    return [f"state(s) {', '.join(bad)}: last two dims not multiples of {STATE_ALIGN} (ANE state rule, "
            "coremltools #2631)"] if bad else []


def _is_const(var) -> bool:
    return var is None or (var.op is not None and var.op.op_type == "const") or var.val is not None


def _dynamic_writes(ops) -> list[str]:
    """``slice_update`` / ``scatter*`` ops whose offsets are computed at run time."""
    bad = sorted({f"{op.op_type}:{op.name}" for op in ops if op.op_type in DYNAMIC_WRITES
                  and not all(_is_const(op.inputs.get(k)) for k in DYNAMIC_WRITES[op.op_type])})
    return [f"{len(bad)} state/tensor write(s) at runtime offsets ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}): "
            "the ANE compiler wants constant offsets (coremltools #2553, #2600)"] if bad else []


def _unsafe_consts(ops) -> list[str]:
    """Non-finite float constants anywhere; subnormal fp16 constants that are not weights (activation math)."""
    import numpy as np

    nonfinite, tiny = set(), set()
    for op in ops:
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        a = np.asarray(val) if val is not None else None
        if a is None or a.dtype not in (np.float16, np.float32) or a.size == 0:
            continue
        flat = a.reshape(-1)
        if not all(np.isfinite(flat[i:i + (1 << 22)]).all() for i in range(0, flat.size, 1 << 22)):  # in slices:
            nonfinite.add(op.name)                                     # an fp16 embedding is 100s of MB
        weight = any(c.op_type.startswith("constexpr") or c.op_type in ("conv", "linear", "gather", "matmul")
                     for c in op.outputs[0].child_ops) and a.ndim >= 2
        if a.dtype == np.float16 and not weight and a.size <= 4096:
            m = np.abs(a.astype(np.float32))
            if bool(((m > 0) & (m < FP16_TINY)).any()):
                tiny.add(op.name)
    out = []
    if nonfinite:
        out.append(f"{len(nonfinite)} constant(s) with inf/NaN (not fp16-safe): {', '.join(sorted(nonfinite)[:3])}")
    if tiny:
        out.append(f"{len(tiny)} fp16 constant(s) with subnormal values (< 2^-14; the ANE may flush them to zero): "
                   f"{', '.join(sorted(tiny)[:3])}")
    return out


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
    return out + _state_findings(spec) + _dynamic_writes(ops) + _unsafe_consts(ops)


def _blob_offsets(spec) -> dict[str, set[tuple[str, int]]]:
    """``{function: {(weight file, offset)}}`` of every blob a function's ops reference (consts and constexpr
    inputs), read from the spec: which bytes of the weight file each function uses."""
    out: dict[str, set[tuple[str, int]]] = {}

    def add(fn: str, v) -> None:
        if v.WhichOneof("value") == "blobFileValue":
            out[fn].add((v.blobFileValue.fileName, int(v.blobFileValue.offset)))

    def walk(fn: str, block) -> None:
        for op in block.operations:
            for v in op.attributes.values():
                add(fn, v)
            for a in op.inputs.values():
                for arg in a.arguments:
                    if arg.WhichOneof("binding") == "value":
                        add(fn, arg.value)
            for b in op.blocks:
                walk(fn, b)

    for name, f in spec.mlProgram.functions.items():
        out[name] = set()
        walk(name, f.block_specializations[f.opset])
    return out


def _blob(fh, offset: int) -> bytes:
    """The data of the blob whose metadata is at ``offset`` (MILBlob storage: sentinel 0xDEADBEEF, dtype,
    size in bytes, data offset)."""
    import struct

    fh.seek(offset)
    sentinel, _, size, data = struct.unpack("<IIQQ", fh.read(24))
    if sentinel != 0xDEADBEEF:
        raise ValueError(f"no blob at offset {offset}")
    fh.seek(data)
    return fh.read(size)


def package_findings(path: str | Path, spec) -> list[str]:
    """The rules that read the package's files: weight files over :data:`MAX_WEIGHT_FILE`, and functions
    of a multifunction package holding separate copies of identical weight blobs."""
    import hashlib

    path = Path(path)
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    out = [f"weight file {f.name} is {f.stat().st_size / 2**30:.2f} GiB, over {MAX_WEIGHT_FILE / 2**30:g} GiB "
           "(iOS / ANE weight-file limit, coremltools PR #2593): export in chunks (--max-chunk-mb)"
           for f in sorted(weights.glob("*")) if f.is_file() and f.stat().st_size > MAX_WEIGHT_FILE]
    if spec.WhichOneof("Type") != "mlProgram" or len(spec.mlProgram.functions) < 2:
        return out
    by_fn = _blob_offsets(spec)
    users: dict[tuple[str, int], set[str]] = {}
    for fn, offs in by_fn.items():
        for o in offs:
            users.setdefault(o, set()).add(fn)
    seen: dict[bytes, tuple[str, int]] = {}
    dup = 0
    files: dict[str, object] = {}
    try:
        for (fname, off), fns in sorted(users.items()):
            if len(fns) == len(by_fn):
                continue   # shared by every function: one copy
            if fname not in files:
                files[fname] = (weights / fname.split("/")[-1]).open("rb")
            data = _blob(files[fname], off)
            h = hashlib.blake2b(data, digest_size=16).digest()
            if h in seen and seen[h] != (fname, off):
                dup += len(data)
            seen.setdefault(h, (fname, off))
    finally:
        for fh in files.values():
            fh.close()
    if dup:
        out.append(f"{dup / 2**20:.1f} MiB of weights stored more than once (functions {', '.join(sorted(by_fn))} "
                   "hold separate copies of identical blobs): the file should hold one copy")
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
    lines = ane_findings(prog, spec) + package_findings(path, spec)
    adv = advice(lines)
    return lines + [f"note: {n}" for n in ane_notes(prog, spec)] + [adv]

"""Read a saved ``.mlpackage`` back: its MIL program, op histogram, weight formats, size, bits/weight.

Everything is derived from the file, not from what the exporter meant to write, so a test or a size
table built on it checks the artefact. Bits/weight charges every constexpr input (indices, LUT, data,
scale, offset) at its stored dtype width, over the weights the constexpr chains produce.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from converters.ane_report import ane_findings, ane_report, package_findings
from converters.mil_io import dir_bytes, function_description, load_program, main_function

__all__ = ["load_program", "inspect_mlpackage", "weight_chains", "chain_value", "dtype_name"]

CONSTEXPR = ("constexpr_lut_to_dense", "constexpr_blockwise_shift_scale", "constexpr_sparse_to_dense",
             "constexpr_affine_dequantize", "constexpr_cast")


def dtype_name(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def _var_bits(var) -> int:
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(var.dtype)
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 8  # fp16 -> 16, uint4 -> 4, int8 -> 8, bool -> 8


def weight_chains(prog, function: str | None = None) -> list[dict]:
    """One entry per final constexpr output (the weight a compute op consumes) of ``function`` (default: main)."""
    chains = []
    for op in prog.functions[function or main_function(prog)].operations:
        if op.op_type not in CONSTEXPR:
            continue
        out = op.outputs[0]
        if any(c.op_type in CONSTEXPR for c in out.child_ops):
            continue  # an intermediate step (e.g. LUT feeding a block scale)
        ops, bits, stack = [], 0, [op]
        while stack:
            cur = stack.pop()
            ops.append(cur)
            for inp in cur.inputs.values():
                if inp.op is not None and inp.op.op_type in CONSTEXPR:
                    stack.append(inp.op)
                elif inp.op is not None and inp.op.op_type == "const" and inp.val is not None and inp.rank > 0:
                    bits += int(np.prod(inp.shape)) * _var_bits(inp)
        kinds = "+".join(o.op_type.removeprefix("constexpr_") for o in reversed(ops))
        first = ops[-1]
        code_var = first.inputs.get("indices", first.inputs.get("data", first.inputs.get("nonzero_data")))
        chains.append({"name": op.name, "kind": kinds, "shape": tuple(out.shape), "numel": int(np.prod(out.shape)),
                       "code_dtype": dtype_name(code_var), "bits": bits, "op": op, "parts": [op],
                       "bits_per_weight": bits / int(np.prod(out.shape))})
    return _merge_dense_sparse(chains)


def _merge_dense_sparse(chains: list[dict]) -> list[dict]:
    """A LUT record with outliers is two chains summed by an ``add`` (dense LUT + ``sparse_to_dense``): one weight,
    charged both chains' bits (the sparse part's 1-bit mask over every weight and its fp16 values)."""
    by_op = {c["op"]: c for c in chains}
    merged, used = [], set()
    for c in chains:
        for user in c["op"].outputs[0].child_ops:
            if user.op_type != "add" or user.x.op not in by_op or user.y.op not in by_op or id(c) in used:
                continue
            a, b = by_op[user.x.op], by_op[user.y.op]
            if a is b or id(a) in used or id(b) in used:
                continue
            used.update((id(a), id(b)))
            merged.append({**a, "name": user.name, "kind": f"{a['kind']}+{b['kind']}", "bits": a["bits"] + b["bits"],
                           "op": user, "parts": [a["op"], b["op"]],
                           "bits_per_weight": (a["bits"] + b["bits"]) / a["numel"]})
    return [c for c in chains if id(c) not in used] + merged


def chain_value(chain: dict) -> np.ndarray:
    """The weight a chain gives the program: the constexpr's value, or for a dense + sparse pair their fp16 sum as
    the ``add`` computes it (a sum of two fp16 values rounded once to fp16)."""
    vals = [np.asarray(op.materialized_val_inference()) for op in chain["parts"]]
    if len(vals) == 1:
        return vals[0]
    return (vals[0].astype(np.float32) + vals[1].astype(np.float32)).astype(vals[0].dtype)


def _bytes(var) -> int:
    return int(np.prod(var.shape)) * _var_bits(var) // 8


def decode_traffic(prog, spec, function: str = "decode") -> dict:
    """``{"weights": bytes, "kv": bytes, "kv_shapes": [...]}`` read by one call of ``function`` (default
    ``decode``; a single-function program's main function if it has no ``decode``)."""
    fn = function if function in prog.functions else main_function(prog, spec)
    ops = prog.functions[fn].operations

    def rows_read(var) -> float:
        """Fraction of ``var`` a step reads: one row if every consumer gathers rows from it, else all."""
        users = list(var.child_ops)
        if users and all(u.op_type == "gather" and u.x is var for u in users):
            return len(users) / var.shape[0]
        return 1.0

    weights = 0.0
    for c in weight_chains(prog, fn):
        weights += c["bits"] / 8 * rows_read(c["op"].outputs[0])
    for op in ops:
        v = op.outputs[0] if op.op_type == "const" else None
        if v is None or v.val is None or v.rank < 1 or any(u.op_type.startswith("constexpr") for u in v.child_ops):
            continue   # constexpr inputs are counted with their chain
        weights += _bytes(v) * rows_read(v)
    states = [list(s.type.stateType.arrayType.shape) for s in function_description(spec, fn).state]
    kv = sum(int(np.prod(s)) * 2 for s in states)   # fp16 states
    return {"weights": int(weights), "kv": kv, "kv_shapes": states}


def inspect_mlpackage(path: str | Path, loaded: tuple | None = None) -> dict:
    """Ops histogram, weight formats (per constexpr kind + code dtype, with bits/weight), size on disk.

    ``loaded``: an already loaded ``(program, spec)`` of ``path``."""
    prog, spec = loaded if loaded is not None else load_program(path)
    fn = main_function(prog, spec)
    desc = function_description(spec, fn)
    ops = Counter(op.op_type for op in prog.functions[fn].operations)
    chains = weight_chains(prog, fn)
    formats: dict[str, dict] = {}
    for c in chains:
        f = formats.setdefault(f"{c['kind']}[{c['code_dtype']}]", {"count": 0, "weights": 0, "bits": 0})
        f["count"] += 1
        f["weights"] += c["numel"]
        f["bits"] += c["bits"]
    for f in formats.values():
        f["bits_per_weight"] = f["bits"] / f["weights"]
    n = sum(c["numel"] for c in chains)
    float_consts = [op for op in prog.functions[fn].operations
                    if op.op_type == "const" and op.outputs[0].rank >= 2 and op.outputs[0].val is not None]
    return {"ops": dict(ops.most_common()), "formats": formats, "n_compressed": len(chains),
            "bits_per_weight": sum(c["bits"] for c in chains) / n if n else 16.0,
            "bytes_on_disk": dir_bytes(Path(path)),
            "float_const_params": int(sum(np.prod(o.outputs[0].shape) for o in float_consts)),
            "float_const_dtypes": dict(Counter(dtype_name(o.outputs[0]) for o in float_consts)),
            "inputs": {i.name: str(i.type.WhichOneof("Type")) for i in desc.input},
            "states": [s.name for s in desc.state], "functions": sorted(prog.functions), "n_weights": n,
            "spec_version": spec.specificationVersion,
            "ane_findings": ane_findings(prog, spec) + package_findings(path, spec),
            "ane_report": ane_report(path, (prog, spec)),
            "decode_traffic": decode_traffic(prog, spec)}

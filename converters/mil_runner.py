"""Numerical execution of a saved ``.mlpackage`` on Linux by MIL value inference — a GRAPH CHECK.

Core ML prediction exists only on macOS. This runner loads the package's MIL program and steps through
its ops with coremltools' own numpy value inference (constexpr ops via ``materialized_val_inference``,
``read_state`` / ``coreml_update_state`` emulated with a dict). It proves the saved graph and weights
compute the right logits; it says nothing about the Neural Engine, its fp16 accumulation or its speed.
Three ops need local evaluators (see shared/PLATFORM.md): ``silu`` and ``conv`` (the ANE graph's 1×1 linears)
have no value inference, and ``reduce_*`` passes ``keepdims`` as ``np.bool_``, which numpy 2 rejects.
``linear`` and ``matmul`` have one, but in the tensors' own dtype: numpy has no BLAS for float16, so an fp16
head took ~2 s per call. Like ``conv`` they are computed here in float32 and stored in the op's dtype (the
value the graph declares; the ANE's own accumulation is not modelled either way). Constexpr weights are
decompressed once per program and reused: they are constants of the saved file.
Multifunction programs (the ANE export's ``prefill`` / ``decode``) run one ``function`` at a time, with the
caller carrying the state dict from call to call.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Callable

import numpy as np

_REDUCE = {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
           "reduce_prod": np.prod}


def _reduce(op, fn):
    x = op.x.val
    axes = None if op.axes is None else tuple(int(a) for a in np.atleast_1d(op.axes.val))
    keep = bool(op.keep_dims.val) if op.keep_dims is not None else False
    return np.asarray(fn(x, axis=axes, keepdims=keep)).astype(x.dtype)


def _silu(op):
    x = op.x.val
    xf = x.astype(np.float32)
    return (xf / (1.0 + np.exp(-xf))).astype(x.dtype)


_F32: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # op making a constant weight -> float32 copy


def _f32(var) -> np.ndarray:
    """A constant weight in float32, converted once (numpy has no float16 BLAS; converting per call cost more
    than the products). Non-constant operands are converted each time."""
    if var.op is None or not (var.op.op_type == "const" or var.op.op_type.startswith("constexpr_")):
        return var.val.astype(np.float32)
    if var.op not in _F32:   # these ops have one output
        _F32[var.op] = var.val.astype(np.float32)
    return _F32[var.op]


def _conv(op):
    """1×1 convolution (the ANE graph's linears), the only conv macq emits; computed in fp32, stored fp16."""
    x, w = op.x.val, _f32(op.weight)
    strides = op.strides.val if op.strides is not None else None
    groups = int(op.groups.val) if op.groups is not None else 1
    if w.shape[2:] != (1, 1) or groups != 1 or (strides is not None and any(int(v) != 1 for v in strides)):
        raise RuntimeError(f"op {op.name}: only 1x1, stride-1, ungrouped conv is evaluated here")
    b, i, h, wd = x.shape
    xs = np.moveaxis(x.astype(np.float32).reshape(b, i, h * wd), 1, 0).reshape(i, -1)      # one BLAS GEMM
    y = np.moveaxis((w[:, :, 0, 0] @ xs).reshape(-1, b, h * wd), 0, 1).reshape(b, -1, h, wd)
    if op.bias is not None:
        y = y + op.bias.val.astype(np.float32)[None, :, None, None]
    return y.astype(x.dtype)


def _linear(op):
    x, w = op.x.val, _f32(op.weight)
    y = np.matmul(x.astype(np.float32), w.T)
    if op.bias is not None:
        y = y + op.bias.val.astype(np.float32)
    return y.astype(x.dtype)


def _matmul(op):
    x, y = op.x.val.astype(np.float32), op.y.val.astype(np.float32)
    if op.transpose_x is not None and op.transpose_x.val:
        x = np.swapaxes(x, -1, -2)
    if op.transpose_y is not None and op.transpose_y.val:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y).astype(op.x.val.dtype)


_LOCAL: dict[str, Callable] = {"silu": _silu, "conv": _conv, "linear": _linear, "matmul": _matmul,
                               **{k: (lambda op, f=f: _reduce(op, f)) for k, f in _REDUCE.items()}}


def _set(var, arr) -> None:
    """Give ``var`` a concrete value (and the matching concrete type, for flexible shapes)."""
    from coremltools.converters.mil.mil import types

    arr = np.asarray(arr)
    dtype = types.numpy_type_to_builtin_type(arr.dtype)
    sym_type = types.tensor(dtype, arr.shape) if arr.ndim else dtype
    val = sym_type()
    val.val = arr
    var._sym_type, var._sym_val = sym_type, val


def run_program(prog, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None,
                function: str = "main") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run ``prog`` (mutated: it holds the last values). Returns ``(outputs, new state)``."""
    func = prog.functions[function]
    state = {} if state is None else {k: np.array(v, copy=True) for k, v in state.items()}
    for name, var in func.inputs.items():
        from coremltools.converters.mil.mil import types

        if types.is_state(var.sym_type):
            if name not in state:
                shape = var.sym_type.wrapped_type().get_shape()
                state[name] = np.zeros(shape, dtype=np.float16)
            continue
        if name not in inputs:
            raise KeyError(f"missing input {name!r}; the program takes {list(func.inputs)}")
        want = types.nptype_from_builtin(var.dtype)
        _set(var, np.asarray(inputs[name]).astype(want))
    with func:  # some type inference (conv) asks for the current block
        _run_ops(func, state)
    outputs = {v.name: np.array(v.val) for v in func.outputs}
    return outputs, state


_CONSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # function -> {op name: decompressed value}


def _run_ops(func, state: dict[str, np.ndarray]) -> None:
    consts = _CONSTS.setdefault(func, {})
    for op in func.operations:
        kind = op.op_type
        if kind == "const":
            continue
        if kind.startswith("constexpr_"):
            if op.name not in consts:
                consts[op.name] = op.materialized_val_inference()
            _set(op.outputs[0], consts[op.name])
        elif kind == "read_state":
            _set(op.outputs[0], state[op.input.name])
        elif kind == "coreml_update_state":
            state[op.state.name] = np.array(op.value.val, copy=True)
            _set(op.outputs[0], state[op.state.name])
        elif kind in _LOCAL:
            _set(op.outputs[0], _LOCAL[kind](op))
        else:
            op.type_value_inference(overwrite_output=True)
            if any(v.val is None for v in op.outputs):
                raise RuntimeError(f"op {op.name} ({kind}) has no value inference")


def run_mil(path: str | Path, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None,
            program=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run a saved ``.mlpackage`` on ``inputs``; ``state`` (name → array) in, new state out.

    Pass ``program`` (from :func:`converters.inspect.load_program`) to skip re-loading for each step.
    Output names are the model's declared outputs (``logits`` [, ``key_cache_out``, ``value_cache_out``]).
    """
    if program is None:
        from converters.mil_io import load_program

        program, _ = load_program(path)
    return run_program(program, inputs, state)

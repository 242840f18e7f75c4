"""coremltools' FLOAT16 pass with an overflow check that does not copy the weights.

``common::add_fp16_cast`` asks, for every op it casts, whether an fp32 const input holds a finite value
beyond fp16's range (``65504 < |v| < 1e38``). It answers with ``np.abs`` of the whole const and
``np.where`` over it: int64 indices for every element, about 30 bytes per weight, a transient that made
one embedding part (16032 × 2048) cost ~1 GiB during conversion. ``macq::add_fp16_cast`` is the same pass
with the same question answered slice by slice (1 Mi elements at a time); :func:`fp16_pipeline` is
coremltools' default pipeline with it in place of the original.

The pass also keeps the ANE graph's placeholder weights (:class:`converters.ane_model.Weights`) lazy. The
original casts every fp32 const by value (``cast`` of a const is folded at once: an fp16 copy of the whole
array, 2 bytes per weight written even though the fp32 placeholder's pages were never touched). A placeholder
(first two values ``m, -m``, the rest zeros) becomes an fp16 placeholder made by ``np.zeros`` with the same
marker: its pages stay unwritten until :func:`converters.weights.place_slots` replaces it, so converting a
chunk costs its records, not its dense size.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

NAME = "macq::add_fp16_cast"
SLICE = 1 << 20


def overflows_fp16(val) -> bool:
    """True iff some element has ``65504 < |v| < 1e38`` (coremltools' criterion: larger values are
    infinities in all but name and may become fp16 inf)."""
    flat = np.asarray(val).reshape(-1)
    for i in range(0, flat.size, SLICE):
        a = np.abs(flat[i:i + SLICE])
        if np.any((a > 65504) & (a < 1e38)):
            return True
    return False


MAX_MARKER = 2048   # markers are small integers, exact in fp16 (converters.ane_model.Weights.MAX_MARKER)


def placeholder_marker(val) -> int | None:
    """The marker ``m`` of a placeholder weight (a 2-D or 1x1-conv 4-D float array starting ``m, -m, 0``),
    else ``None``. Reads three elements: a placeholder's other pages are never touched."""
    if not isinstance(val, np.ndarray) or val.dtype not in (np.float32, np.float16) or val.ndim not in (2, 4) \
            or val.size < 3 or (val.ndim == 4 and val.shape[2:] != (1, 1)):
        return None
    m, neg, zero = (float(x) for x in val.flat[:3])
    return int(m) if m == int(m) and 1 <= m < MAX_MARKER and neg == -m and zero == 0 else None


def _inputs(op):
    for inputs in op.inputs.values():
        yield from inputs if isinstance(inputs, (list, tuple)) else [inputs]


def _fp32_const(var) -> bool:
    return var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")


class LeanFP16Cast(add_fp16_cast):
    """``common::add_fp16_cast`` whose overflow check reads each const in slices, and whose placeholder
    weights become lazy fp16 placeholders instead of fp16 copies (see the module doc)."""

    @staticmethod
    def fp16_overflow(op) -> bool:
        for var in _inputs(op):
            if _fp32_const(var) and placeholder_marker(var.op.val.val) is None and overflows_fp16(var.op.val.val):
                return True
        return False

    def transform_op(self, op) -> None:
        if not any(_fp32_const(v) and placeholder_marker(v.op.val.val) is not None for v in _inputs(op)):
            return super().transform_op(op)
        import coremltools.converters.mil.mil.passes.defs.quantization as base

        builder = base.mb
        base.mb = _LazyCastBuilder(builder)   # the parent's ``mb.cast`` of a placeholder: a lazy fp16 const
        try:
            super().transform_op(op)
        finally:
            base.mb = builder


class _LazyCastBuilder:
    """The MIL builder, except that ``cast`` of a placeholder const to fp16 gives a new fp16 placeholder
    (``np.zeros``: untouched pages) with the same marker instead of an fp16 copy of the array."""

    def __init__(self, mb):
        self._mb = mb

    def __getattr__(self, name):
        return getattr(self._mb, name)

    def cast(self, x, dtype, **kw):
        m = placeholder_marker(x.op.val.val) if dtype == "fp16" and _fp32_const(x) else None
        if m is None:
            return self._mb.cast(x=x, dtype=dtype, **kw)
        lazy = np.zeros(x.shape, dtype=np.float16)
        lazy.flat[:2] = (m, -m)
        return self._mb.const(val=lazy, **kw)


if NAME not in PASS_REGISTRY:
    register_pass(namespace="macq", override=False, name="add_fp16_cast")(LeanFP16Cast)


def fp16_pipeline():
    """coremltools' default pass pipeline with :class:`LeanFP16Cast` in place of ``common::add_fp16_cast``."""
    import coremltools as ct

    pipeline = ct.PassPipeline()
    pipeline.passes = [NAME if p == "common::add_fp16_cast" else p for p in pipeline.passes]
    return pipeline

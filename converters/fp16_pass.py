"""coremltools' FLOAT16 pass with an overflow check that does not copy the weights.

``common::add_fp16_cast`` asks, for every op it casts, whether an fp32 const input holds a finite value
beyond fp16's range (``65504 < |v| < 1e38``). It answers with ``np.abs`` of the whole const and
``np.where`` over it: int64 indices for every element, about 30 bytes per weight, a transient that made
one embedding part (16032 × 2048) cost ~1 GiB during conversion. ``macq::add_fp16_cast`` is the same pass
with the same question answered slice by slice (1 Mi elements at a time); :func:`fp16_pipeline` is
coremltools' default pipeline with it in place of the original.
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


class LeanFP16Cast(add_fp16_cast):
    """``common::add_fp16_cast`` whose overflow check reads each const in slices."""

    @staticmethod
    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32") \
                        and overflows_fp16(var.op.val.val):
                    return True
        return False


if NAME not in PASS_REGISTRY:
    register_pass(namespace="macq", override=False, name="add_fp16_cast")(LeanFP16Cast)


def fp16_pipeline():
    """coremltools' default pass pipeline with :class:`LeanFP16Cast` in place of ``common::add_fp16_cast``."""
    import coremltools as ct

    pipeline = ct.PassPipeline()
    pipeline.passes = [NAME if p == "common::add_fp16_cast" else p for p in pipeline.passes]
    return pipeline

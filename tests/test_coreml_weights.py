"""The record → constexpr pass on hand-built MIL programs (no torch conversion: fast and targeted).

Covers what the tiny-model exports do not: a weight stored transposed (``[in, out]``, as GPT-2's Conv1D
or a folded transpose leaves it), records sharing one value, and a record the program lacks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.synthetic import affine_record, nf4_record, uniform_lut_record
from converters.weights import apply_records_to_program, plan_layouts
from macq.errors import MacqError
from macq.quantizers import grid
from macq.record import AffineRecord


def _per_tensor(w: torch.Tensor) -> AffineRecord:
    s, z, _ = grid.affine_params(w.reshape(1, 1, -1), 4, symmetric=False)
    q = grid.quantize_codes(w.reshape(1, 1, -1), s, z, None, 4).view(w.shape)
    return AffineRecord(codes=q, scales=s, zeros=z, bits=4, group_size=w.shape[1], per_tensor=True)


def _all_positive_bias(w: torch.Tensor) -> AffineRecord:
    """Bias form with an integer −b/s outside the code range (an all-positive group): fp16 offset, exact."""
    rec = affine_record(w.abs() + 1.0, 4, 32, "asym")
    s = rec.scales
    z = torch.round(-(w.abs() + 1.0).view(*s.shape, -1).amin(-1) / s)   # negative integer zero-points
    return AffineRecord(codes=rec.codes, scales=s, biases=-s * z, bits=4, group_size=32)


def _program(weights: list[np.ndarray]):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, weights[0].shape[0]), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(x):
        for i, w in enumerate(weights):
            x = mb.matmul(x=x, y=w, name=f"mm{i}")
        return x

    return prog


def _constexpr_outputs(prog) -> list[np.ndarray]:
    ops = prog.functions["main"].operations
    return [np.asarray(op.materialized_val_inference()) for op in ops
            if op.op_type.startswith("constexpr") and not any(c.op_type.startswith("constexpr")
                                                              for c in op.outputs[0].child_ops)]


@pytest.mark.parametrize("build", [
    lambda w: uniform_lut_record(w, 4, 16),                 # LUT groups of rows → groups along axis 1
    lambda w: affine_record(w, 4, 32, "asym"),               # blocks along input → along axis 0
    lambda w: affine_record(w, 8, None, "sym"),
    lambda w: nf4_record(w, 64, False),                      # per-block LUT, transposed
    _per_tensor,
    _all_positive_bias,
], ids=["lut", "affine-g32", "int8-per-channel", "nf4", "per-tensor", "bias-negative-zero"])
def test_transposed_weight_is_placed_exactly(build):
    torch.manual_seed(0)
    rec = build(torch.randn(48, 128))                       # [out, in]
    w = rec.dequantize(torch.float32).half().numpy()
    prog = _program([np.ascontiguousarray(w.T)])            # the program holds [in, out]
    layouts, _ = plan_layouts({"a": rec})
    placed = apply_records_to_program(prog, {"a": rec}, layouts)
    assert len(placed["a"]) == 1
    (got,) = _constexpr_outputs(prog)
    assert got.shape == (128, 48) and np.array_equal(got.view(np.uint16), np.ascontiguousarray(w.T).view(np.uint16))


def test_identical_records_share_a_const_and_missing_record_raises():
    torch.manual_seed(1)
    w = torch.randn(64, 64)
    a, b = uniform_lut_record(w, 4), uniform_lut_record(w.clone(), 4)
    prog = _program([a.dequantize().half().numpy()])
    layouts, _ = plan_layouts({"a": a, "b": b})
    placed = apply_records_to_program(prog, {"a": a, "b": b}, layouts)
    assert placed["a"] == placed["b"] and len(placed["a"]) == 1

    other = uniform_lut_record(torch.randn(64, 64), 4)
    prog = _program([a.dequantize().half().numpy()])
    layouts, _ = plan_layouts({"a": a, "zz.missing": other})
    with pytest.raises(MacqError, match="zz.missing"):
        apply_records_to_program(prog, {"a": a, "zz.missing": other}, layouts)


def test_non_fp16_affine_scales_refused_unless_fallback():
    torch.manual_seed(2)
    rec = affine_record(torch.randn(32, 64), 4, 32, "asym")
    rec.scales = rec.scales * (1 + 1e-6)                     # fp32 values fp16 cannot hold
    with pytest.raises(MacqError, match="fp16"):
        plan_layouts({"l": rec})
    _, notes = plan_layouts({"l": rec}, allow_fallback=True)
    assert any("rounded to fp16" in n for n in notes)

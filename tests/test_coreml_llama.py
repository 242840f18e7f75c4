"""Core ML export of a tiny Llama with one record of every layout: placement, exact read-back, graph run.

Linux only checks the graph (MIL value inference), not the Neural Engine. Tolerance for logits: the
program computes in fp16 and the reference in fp32 torch on the same dequantized weights; the observed
max abs error is ~5e-3 on logits of magnitude ~3, the bound below is 3e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converters import export_coreml
from converters.inspect import load_program, weight_chains
from converters.mil_runner import run_mil
from converters.synthetic import affine_record, nf4_record, uniform_lut_record
from converters.wrapper import causal_mask
from macq.models import get_weight
from macq.qmodel import QuantizedModel
from macq.tiny import tiny_model

LOGIT_TOL = 3e-2

# module suffix -> (builder, expected chain kind, expected code dtype)
LAYER0 = {
    "self_attn.q_proj": (lambda w: affine_record(w, 4, 32, "asym"), "blockwise_shift_scale", "uint4"),
    "self_attn.k_proj": (lambda w: affine_record(w, 8, None, "sym"), "blockwise_shift_scale", "int8"),
    "self_attn.v_proj": (lambda w: affine_record(w, 3, 16, "asym"), "blockwise_shift_scale", "uint4"),
    "self_attn.o_proj": (lambda w: affine_record(w, 4, 32, "bias_int"), "blockwise_shift_scale", "uint4"),
    "mlp.gate_proj": (lambda w: uniform_lut_record(w, 4, 16), "lut_to_dense", "uint4"),
    "mlp.up_proj": (lambda w: uniform_lut_record(w, 2), "lut_to_dense", "uint2"),
    "mlp.down_proj": (lambda w: nf4_record(w, 64, True), "lut_to_dense", "uint4"),
}
LAYER1 = {
    "self_attn.q_proj": (lambda w: nf4_record(w, 64, False), "lut_to_dense", "uint4"),
    "self_attn.k_proj": (lambda w: uniform_lut_record(w, 6, 8), "lut_to_dense", "uint6"),
    "self_attn.v_proj": (lambda w: affine_record(w, 8, None, "asym"), "blockwise_shift_scale", "uint8"),
    "self_attn.o_proj": (lambda w: affine_record(w, 4, 16, "sym"), "blockwise_shift_scale", "int4"),
    "mlp.gate_proj": (lambda w: uniform_lut_record(w, 3, 32), "lut_to_dense", "uint3"),
    "mlp.up_proj": (lambda w: affine_record(w, 2, 32, "asym"), "blockwise_shift_scale", "uint4"),
    "mlp.down_proj": (lambda w: affine_record(w, 4, 32, "sym"), "blockwise_shift_scale", "int4"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model("llama")
    records, expect = {}, {}
    for layer, table in ((0, LAYER0), (1, LAYER1)):
        for suffix, (build, kind, dtype) in table.items():
            name = f"model.layers.{layer}.{suffix}"
            records[name] = build(get_weight(model.get_submodule(name)).detach().float())
            expect[name] = (kind, dtype)
    records["lm_head"] = affine_record(model.lm_head.weight.detach().float(), 4, 32, "asym")
    expect["lm_head"] = ("blockwise_shift_scale", "uint4")
    qm = QuantizedModel.from_model(model, records)
    out = tmp_path_factory.mktemp("coreml") / "tiny_llama.mlpackage"
    res = export_coreml(qm, out, context=32, graph="hf")
    prog, _ = load_program(out)
    return qm, expect, res, prog


def _chain_for(chains, name):
    key = name.replace(".", "_")
    found = [c for c in chains if key + "_" in c["name"]]
    assert len(found) == 1, (name, [c["name"] for c in chains])
    return found[0]


def test_every_record_is_a_constexpr_of_the_expected_kind(exported):
    qm, expect, res, prog = exported
    chains = weight_chains(prog)
    assert len(chains) == len(qm.records)
    for name, (kind, dtype) in expect.items():
        c = _chain_for(chains, name)
        assert (c["kind"], c["code_dtype"]) == (kind, dtype), name
        assert c["shape"] == qm.records[name].shape
    # no float copy of a quantized weight survived (either orientation)
    weights = [r.dequantize(torch.float32).half().numpy() for r in qm.records.values()]
    for op in prog.functions["main"].operations:
        val = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(val, np.ndarray) and val.ndim == 2:
            assert not any(np.array_equal(val, w) or np.array_equal(val, w.T) for w in weights), op.name


def test_weights_read_back_bit_exact(exported):
    """LUT and affine alike: the file decompresses to exactly ``record.dequantize().half()``."""
    qm, _, _, prog = exported
    chains = weight_chains(prog)
    for name, rec in qm.records.items():
        got = np.asarray(_chain_for(chains, name)["op"].materialized_val_inference())
        want = rec.dequantize(torch.float32).half().numpy()
        assert got.dtype == np.float16
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), name


def test_bits_per_weight_from_file(exported):
    qm, _, res, prog = exported
    chains = weight_chains(prog)
    # affine uint4 g32 + fp16 scale + uint4 offset
    assert _chain_for(chains, "model.layers.0.self_attn.q_proj")["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 4 / 32)
    # 4-bit LUT, one fp16 table of 16 per 16 rows of 64 inputs
    assert _chain_for(chains, "model.layers.0.mlp.gate_proj")["bits_per_weight"] == pytest.approx(4 + 16 * 16 / (16 * 64))
    # NF4 (code book not fp16 values): per-block LUT, 16 fp16 entries per 64 weights, honestly charged
    assert _chain_for(chains, "model.layers.1.self_attn.q_proj")["bits_per_weight"] == pytest.approx(4 + 16 * 16 / 64)
    assert any("per-block LUT" in n and "layers.1.self_attn.q_proj" in n for n in res.notes)
    assert 4 < res.bits_per_weight < 6
    assert res.bytes_on_disk > 0 and res.ops["constexpr_lut_to_dense"] == 6
    assert res.ane_report[-1].startswith("advice:")


def test_mil_run_prefill_then_two_decodes_matches_torch(exported):
    qm, _, res, prog = exported
    ids = np.array([[5, 17, 200, 3, 99, 410]], dtype=np.int32)
    with torch.no_grad():
        ref = qm.to_torch(torch.float32)(torch.from_numpy(ids).long()).logits[0].numpy()
    out, state = run_mil(res.path, {"input_ids": ids[:, :4], "causal_mask": causal_mask(4, 0)}, None, program=prog)
    logits = [out["logits"][0]]
    assert set(state) == {"key_cache", "value_cache"}
    for t in (4, 5):
        out, state = run_mil(res.path, {"input_ids": ids[:, t:t + 1], "causal_mask": causal_mask(1, t)}, state,
                             program=prog)
        logits.append(out["logits"][0])
    got = np.concatenate(logits).astype(np.float32)
    err = np.abs(got - ref).max()
    assert err < LOGIT_TOL, err
    assert np.abs(state["key_cache"][:, :, :, 6:]).max() == 0  # nothing written past the 6 tokens
    assert np.abs(state["key_cache"][:, :, :, :6]).max() > 0

"""Fixed-shape stateful export (query length 1, mask width = context, explicit ``position``): the
ANE-oriented decode graph. Graph check by MIL value inference (Linux); logit tolerance 3e-2."""

from __future__ import annotations

import numpy as np
import torch

from converters import export_coreml, inspect_mlpackage
from converters.inspect import load_program
from converters.mil_runner import run_mil
from converters.synthetic import affine_record
from converters.wrapper import causal_mask
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.tiny import tiny_model

CTX = 32


def test_fixed_shape_decode_matches_torch(tmp_path):
    model = tiny_model("llama", seed=1)
    recs = {n: affine_record(get_weight(m).detach().float(), 4, None, "sym") for n, m in quantizable_modules(model).items()}
    qm = QuantizedModel.from_model(model, recs)
    res = export_coreml(qm, tmp_path / "fixed.mlpackage", context=CTX, fixed_shapes=True, graph="hf")
    info = inspect_mlpackage(res.path)
    assert "position" in info["inputs"] and not any("RangeDim" in line for line in res.ane_report)
    assert set(info["formats"]) == {"blockwise_shift_scale[int4]"}   # per-channel int4: the ANE format
    n = sum(r.shape[0] * r.shape[1] for r in recs.values())
    want_bits = 4 + 16 * sum(r.shape[0] for r in recs.values()) / n   # int4 codes + one fp16 scale per row
    assert abs(info["formats"]["blockwise_shift_scale[int4]"]["bits_per_weight"] - want_bits) < 1e-12

    ids = np.array([[11, 250, 3, 77]], dtype=np.int32)
    with torch.no_grad():
        ref = qm.to_torch(torch.float32)(torch.from_numpy(ids).long()).logits[0].numpy()
    prog, _ = load_program(res.path)
    state, got = None, []
    for t in range(ids.shape[1]):
        out, state = run_mil(res.path, {"input_ids": ids[:, t:t + 1], "causal_mask": causal_mask(1, t, CTX),
                                        "position": np.array([t], dtype=np.int32)}, state, program=prog)
        got.append(out["logits"][0])
    err = np.abs(np.concatenate(got).astype(np.float32) - ref).max()
    assert err < 3e-2, err
    assert np.abs(state["value_cache"][:, :, :, 4:]).max() == 0

"""Tiny Qwen2 (q/k/v bias, tied embeddings) as the non-stateful KV-in / KV-out variant.

The tied embedding record feeds both the gather and the lm_head; the MIL value-inference run (graph
check, Linux) goes prefill → two decode steps by passing the returned caches back in. Logit tolerance
3e-2 (fp16 program vs fp32 torch on identical weights; observed ~5e-3).
"""

from __future__ import annotations

import numpy as np
import torch

from converters import export_coreml, inspect_mlpackage
from converters.inspect import load_program, weight_chains
from converters.mil_runner import run_mil
from converters.synthetic import affine_record, uniform_lut_record
from converters.wrapper import causal_mask, kv_shape
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.tiny import tiny_model

LOGIT_TOL = 3e-2


def test_qwen2_kv_in_out_tied_embedding(tmp_path):
    model = tiny_model("qwen2")
    mods = quantizable_modules(model, include_embeddings=True)
    assert "model.embed_tokens" in mods
    records = {}
    for i, (name, mod) in enumerate(mods.items()):
        w = get_weight(mod).detach().float()
        records[name] = uniform_lut_record(w, 4, 16) if i % 2 else affine_record(w, 4, 32, "asym")
    qm = QuantizedModel.from_model(model, records)
    assert qm.tied == {"lm_head": "model.embed_tokens"}
    res = export_coreml(qm, tmp_path / "q.mlpackage", context=16, stateful=False, graph="hf")

    info = inspect_mlpackage(res.path)
    assert info["states"] == [] and {"key_cache_in", "value_cache_in"} <= set(info["inputs"])
    prog, _ = load_program(res.path)
    chains = weight_chains(prog)
    by_value = {}
    for c in chains:
        by_value.setdefault(np.asarray(c["op"].materialized_val_inference()).tobytes(), []).append(c)
    for name, rec in records.items():
        want = rec.dequantize(torch.float32).half().numpy()
        hits = by_value.get(want.tobytes(), []) + by_value.get(np.ascontiguousarray(want.T).tobytes(), [])
        assert hits, name  # placed, bit-exact
    emb = records["model.embed_tokens"].dequantize().half().numpy().tobytes()
    users = {u.op_type for c in by_value[emb] for u in c["op"].outputs[0].child_ops}
    assert {"gather"} <= users and users & {"linear", "matmul"}, users  # embedding and lm_head share it

    ids = np.array([[7, 300, 42, 9, 128]], dtype=np.int32)
    with torch.no_grad():
        ref = qm.to_torch(torch.float32)(torch.from_numpy(ids).long()).logits[0].numpy()
    k = v = np.zeros(kv_shape(qm.config, 16), dtype=np.float16)
    got = []
    for start, n in ((0, 3), (3, 1), (4, 1)):
        out, _ = run_mil(res.path, {"input_ids": ids[:, start:start + n], "causal_mask": causal_mask(n, start),
                                    "key_cache_in": k, "value_cache_in": v}, program=prog)
        k, v = out["key_cache_out"], out["value_cache_out"]
        got.append(out["logits"][0])
    err = np.abs(np.concatenate(got).astype(np.float32) - ref).max()
    assert err < LOGIT_TOL, err
    assert np.abs(k[:, :, :, 5:]).max() == 0 and np.abs(k[:, :, :, :5]).max() > 0

"""The Neural Engine rules of the ANE gate: for each rule, a small program that breaks it is reported, and
macq's own export obeys it (read back from the saved package).

Rules (sources in converters/ane_report.py): tensors over the ANE's largest dimension (LM head split), state
dims multiples of 32, state writes at constant offsets, fp16-safe constants, weight files <= 1 GiB, one copy
of the weights shared by prefill and decode. The tiny model's head_dim (16) and a context of 20 are not
multiples of 32, so the export has to pad them; its logits must still match transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import converters.ane_report as rep
from converters import export_coreml
from converters.ane_runner import AneSession
from converters.inspect import load_program
from converters.mil_io import quiet_ct
from converters.synthetic import affine_record
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.tiny import tiny_model

ct = quiet_ct()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

CTX, PREFILL = 20, 8


def _qm() -> QuantizedModel:
    model = tiny_model("llama", seed=5)
    recs = {n: affine_record(get_weight(m).detach().float(), 4, 32, "asym") for n, m in quantizable_modules(model).items()}
    return QuantizedModel.from_model(model, recs, source="tiny")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    qm = _qm()
    d = tmp_path_factory.mktemp("rules")
    return qm, export_coreml(qm, d / "m.mlpackage", context=CTX, prefill_len=PREFILL)


def _save(prog, path, states: bool = False):
    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True,
                    compute_precision=ct.precision.FLOAT16, pass_pipeline=ct.PassPipeline.EMPTY)
    ml.save(str(path))
    return path


def _findings(path) -> list[str]:
    prog, spec = load_program(path)
    return rep.ane_findings(prog, spec) + rep.package_findings(path, spec)


def _stateful(shape, write):
    @mb.program(input_specs=[mb.StateTensorSpec(shape, dtype=types.fp16), mb.TensorSpec((1, 1, 1, shape[-1]), dtype=types.fp16),
                             mb.TensorSpec((4,), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(cache, x, begin):
        old = mb.read_state(input=cache)
        new = write(old, x, begin)
        mb.coreml_update_state(state=cache, value=new)
        return mb.reduce_sum(x=new, axes=[2])
    return prog


def test_state_dims_not_multiple_of_32_is_a_finding(tmp_path):
    onehot = lambda old, x, begin: mb.add(x=old, y=x)   # noqa: E731 - a constant-form write
    bad = _findings(_save(_stateful((1, 2, 20, 16), onehot), tmp_path / "bad.mlpackage"))
    assert any("not multiples of 32" in f and "[1, 2, 20, 16]" in f for f in bad), bad
    good = _findings(_save(_stateful((1, 2, 32, 32), onehot), tmp_path / "good.mlpackage"))
    assert not any("multiples of 32" in f for f in good), good


def test_state_write_at_runtime_offset_is_a_finding(tmp_path):
    def dynamic(old, x, begin):
        return mb.slice_update(x=old, update=x, begin=begin, end=mb.add(x=begin, y=np.array([1, 1, 1, 32], np.int32)))

    def constant(old, x, begin):
        return mb.slice_update(x=old, update=x, begin=np.array([0, 0, 3, 0], np.int32), end=np.array([1, 1, 4, 32], np.int32))

    bad = _findings(_save(_stateful((1, 1, 32, 32), dynamic), tmp_path / "dyn.mlpackage"))
    assert any("runtime offsets" in f and "slice_update" in f for f in bad), bad
    good = _findings(_save(_stateful((1, 1, 32, 32), constant), tmp_path / "const.mlpackage"))
    assert not any("runtime offsets" in f for f in good), good


def test_fp16_unsafe_constants_are_findings(tmp_path):
    for val, word in [(np.float16(1e-6), "subnormal"), (np.float16(np.inf), "inf/NaN")]:
        @mb.program(input_specs=[mb.TensorSpec((1, 8), dtype=types.fp16)], opset_version=ct.target.iOS18)
        def prog(x):
            return mb.maximum(x=x, y=np.full((1, 8), val, np.float16))
        found = _findings(_save(prog, tmp_path / f"{word[:3]}.mlpackage"))
        assert any(word in f for f in found), (word, found)


def test_dimension_over_the_ane_limit_is_a_finding(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((1, 64), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def prog(x):   # an unsplit LM head: 20000 outputs > 16384
        return mb.linear(x=x, weight=np.zeros((20000, 64), np.float16) + np.float16(0.01))
    found = _findings(_save(prog, tmp_path / "head.mlpackage"))
    assert any(f"over {rep.MAX_ANE_DIM}" in f for f in found), found


def test_weight_file_over_the_limit_is_a_finding(export, monkeypatch):
    _, res = export
    size = (res.path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size
    assert not any("weight file" in f for f in _findings(res.path))
    monkeypatch.setattr(rep, "MAX_WEIGHT_FILE", size - 1)
    assert any("weight file weight.bin" in f for f in _findings(res.path))


def test_functions_with_separate_weight_copies_are_a_finding(export, tmp_path, monkeypatch):
    """The same chunk saved without macq's weight sharing stores every blob once per function: the gate
    sees identical blobs at two offsets; with sharing (the module's export, same model and shapes) the file is
    one copy (about half the size)."""
    import converters.multifunction as mf

    qm, shared = export
    monkeypatch.setattr(mf, "share_weights", lambda prog: 0)
    twice = export_coreml(qm, tmp_path / "twice.mlpackage", context=CTX, prefill_len=PREFILL)
    found = _findings(twice.path)
    assert any("stored more than once" in f for f in found), found
    assert not any("stored more than once" in f for f in _findings(shared.path))
    blob = lambda r: (r.path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size  # noqa: E731
    assert 1.9 < blob(twice) / blob(shared) < 2.1


def test_macq_export_obeys_every_rule_and_matches_transformers(export):
    qm, res = export
    assert res.ane_report[-1] == "ANE gate: no findings"
    prog, spec = load_program(res.path)
    for f in spec.description.functions:   # states padded: context 20 -> 32 slots, head_dim 16 -> 32 columns
        assert [list(s.type.stateType.arrayType.shape) for s in f.state] == [[2, 2, 32, 32]] * 2
    ops = [op for fn in prog.functions.values() for op in fn.operations]
    assert not rep._dynamic_writes(ops) and not rep._unsafe_consts(ops)
    writes = [op for op in ops if op.op_type == "slice_update"]   # one per layer and cache, at the layer's index
    assert len(writes) == 2 * 2 * 2 and all(op.begin.val is not None and op.end.val is not None for op in writes)
    ids = np.array([3, 17, 200, 5, 9, 41, 7, 8, 300, 2, 11, 12], dtype=np.int64)
    s = AneSession(res.path, backend="mil")
    got = np.concatenate([s.feed(ids[:9]), s.feed(ids[9:], prefill=False)])
    with torch.no_grad():
        ref = qm.to_torch(torch.float32)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(got - ref).max() < 3e-2


def test_decode_traffic_counts_weights_once_and_the_whole_cache(export):
    """Bytes per decoded token, recomputed from the records: affine 4-bit g32 with uint4 offsets costs
    4 + 16/32 + 4/32 bits per weight; the float (fp16) LM head is read whole, with the zero bias the
    converter gives a bias-free linear; the float embedding costs one row per vocabulary part, RoPE one row
    per table; the KV term is the allocated state exactly."""
    from converters.expect import decode_traffic

    qm, res = export
    prog, spec = load_program(res.path)
    t = decode_traffic(prog, spec)
    cfg = qm.config
    assert t["kv"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 32 * 32 * 2
    assert not any("embed" in n or "lm_head" in n for n in qm.records)   # tiny model: both stay float
    recs = sum(r.shape[0] * r.shape[1] for r in qm.records.values()) * (4 + 16 / 32 + 4 / 32) / 8
    c, v = cfg.hidden_size, cfg.vocab_size
    floats = (v * c + v + c * (2 * cfg.num_hidden_layers + 1) + c + 2 * 16) * 2   # head, bias, norms, rows
    assert recs + floats <= t["weights"] <= 1.02 * (recs + floats), (t["weights"], recs, floats)


def test_checkpoint_export_streams_records_through_a_scratch_dir(tmp_path):
    """A Core ML export from a checkpoint with a weight method follows the planner's streamed route: records
    quantized one tensor at a time into a scratch quantization beside the output, read back lazily by the
    converter (never the float model), and the scratch directory removed; the package holds the same bits as the
    in-memory route's."""
    import numpy as np

    from converters.inspect import chain_value, load_program, weight_chains
    from macq.plan import Request, make_plan, run_plan
    from macq.tiny import save_tiny_model

    src = save_tiny_model(tmp_path / "ckpt", "llama")
    opts = {"bits": 4, "group_size": 32}
    streamed = make_plan(Request(str(src), tmp_path / "out" / "m.mlpackage", target="coreml", method="rtn", options=opts))
    memory = make_plan(Request(str(src), tmp_path / "mem" / "m.mlpackage", target="coreml", method="rtn", options=opts,
                               stream=False))
    assert (streamed.route, memory.route) == ("stream", "memory")
    run_plan(streamed)
    run_plan(memory)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.mlpackage"]
    a = weight_chains(load_program(tmp_path / "out" / "m.mlpackage")[0])
    b = weight_chains(load_program(tmp_path / "mem" / "m.mlpackage")[0])
    assert [c["name"] for c in a] == [c["name"] for c in b] and len(a) > 0
    for ca, cb in zip(a, b):
        assert np.array_equal(chain_value(ca), chain_value(cb)), ca["name"]


def test_embedding_and_head_split_by_vocabulary_under_max_chunk_mb(tmp_path, monkeypatch):
    """Under a --max-chunk-mb smaller than the (float) embedding and head, both are split into packages of
    whole vocabulary parts; every weight file stays under the limit and the chained logits equal the single
    package's bit for bit (the embedding packages' outputs add a row and zeros)."""
    import converters.ane_model as ane_model
    from converters.chunks import plan_chunks, read_manifest

    monkeypatch.setattr(ane_model, "MAX_DIM", 200)   # 512 tokens -> 3 parts, as 128,256 -> 8 at 16384
    qm = _qm()
    emb = plan_chunks(qm, 1, None)[0].est_bytes
    limit = emb * 0.5 / 2**20
    single = export_coreml(qm, tmp_path / "one.mlpackage", context=32, prefill_len=PREFILL)
    split = export_coreml(qm, tmp_path / "split", context=32, prefill_len=PREFILL, max_chunk_mb=limit)
    m, root = read_manifest(split.path)
    assert [(c.embed, c.head, c.parts) for c in m.chunks if c.stop == c.start] == \
        [(True, False, [0]), (True, False, [1]), (True, False, [2]), (False, True, [0]), (False, True, [1]), (False, True, [2])]
    for c in m.chunks:
        assert (root / c.path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size <= limit * 2**20
    assert split.ane_report[-1] == "ANE gate: no findings"
    ids = np.array([3, 17, 200, 5, 9, 41, 7, 8, 300, 2, 11, 12, 450, 190], dtype=np.int64)
    got = []
    for path in (single.path, split.path):
        s = AneSession(path, backend="mil")
        got.append(np.concatenate([s.feed(ids[:10]), s.feed(ids[10:], prefill=False)]))
    assert np.array_equal(got[0], got[1])
    with torch.no_grad():
        ref = qm.to_torch(torch.float32)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(got[1] - ref).max() < 3e-2


def test_rope_tables_over_64kib_are_stored_once(tmp_path):
    """Each function traces its own RoPE tables; at Llama-3-8B's head_dim (128) each table is 128 KiB at context
    512 (72 KiB at 288, over the 64 KiB that content matching once stopped at), and both functions' copies must
    still be one blob (matched by content, not by address)."""
    model = tiny_model("llama", seed=5, hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                       max_position_embeddings=288)
    recs = {n: affine_record(get_weight(m).detach().float(), 4, 32, "asym") for n, m in quantizable_modules(model).items()}
    qm = QuantizedModel.from_model(model, recs, source="tiny")
    res = export_coreml(qm, tmp_path / "m.mlpackage", context=288, prefill_len=PREFILL)
    assert not any("stored more than once" in f for f in _findings(res.path)), _findings(res.path)

"""The default Core ML export: macq's ANE-shaped graph, fixed shapes, prefill + decode functions, chunks.

Run on Linux by MIL value inference (a graph check, not the Neural Engine). The reference is transformers'
own model on the same dequantized weights, in fp32; the export computes in fp16, so logits agree to the
fp16 tolerance 3e-2 (observed ~6e-3 on logits of magnitude ~3). A chunked export must give the very same
logits as the single package: the chunk boundary only moves an fp16 tensor from one program to the next.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import converters.ane_model as ane_model
import converters.chunks as chunks_mod
from converters import export_coreml
from converters.ane_report import ane_findings
from converters.ane_runner import AneSession, predict_ane
from converters.chunks import plan_chunks, read_manifest
from converters.inspect import inspect_mlpackage, load_program, weight_chains
from converters.multifunction import chunk_records
from converters.synthetic import affine_record, nf4_record, uniform_lut_record
from converters.weights import slice_rows
from macq.errors import MacqError
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.tiny import tiny_model

CTX, PREFILL, TOL = 32, 8, 3e-2
IDS = np.array([11, 250, 3, 77, 5, 9, 100, 200, 300, 1, 2, 3, 4, 5, 6], dtype=np.int64)  # 11 prompt + 4 decode
LAYER0 = {  # every record layout: affine asym/sym, per-channel int8, grouped and per-channel LUT, NF4 per-block LUT
    "self_attn.q_proj": lambda w: affine_record(w, 4, 32, "asym"),
    "self_attn.k_proj": lambda w: affine_record(w, 8, None, "sym"),
    "self_attn.v_proj": lambda w: uniform_lut_record(w, 4, 16),
    "self_attn.o_proj": lambda w: uniform_lut_record(w, 4, 1),
    "mlp.gate_proj": lambda w: affine_record(w, 4, 16, "sym"),
    "mlp.up_proj": lambda w: nf4_record(w, 64, True),
    "mlp.down_proj": lambda w: affine_record(w, 8, 32, "asym"),
}


def _qm(arch: str) -> QuantizedModel:
    model = tiny_model(arch, seed=3)
    recs = {}
    for n, m in quantizable_modules(model).items():
        w = get_weight(m).detach().float()
        suffix = n.split("model.layers.0.")[-1]
        recs[n] = LAYER0[suffix](w) if n.startswith("model.layers.0.") else affine_record(w, 4, 32, "asym")
    if arch == "qwen2":  # tied: the embedding record (per-grouped-channel LUT) is also the head's
        recs["model.embed_tokens"] = uniform_lut_record(model.model.embed_tokens.weight.detach().float(), 4, 16)
    else:
        recs["lm_head"] = uniform_lut_record(model.lm_head.weight.detach().float(), 4, 16)
    return QuantizedModel.from_model(model, recs, source="tiny")


def _logits(path) -> np.ndarray:
    s = AneSession(path, backend="mil")
    got = np.concatenate([s.feed(IDS[:11]), s.feed(IDS[11:], prefill=False)])
    assert [k for k, _ in s.timing.calls] == ["prefill", "prefill"] + ["decode"] * 4  # 8 + padded 3, then 4 steps
    return got


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exports(request, tmp_path_factory):
    arch = request.param
    qm = _qm(arch)
    d = tmp_path_factory.mktemp(f"ane_{arch}")
    with pytest.MonkeyPatch.context() as mp:
        if arch == "qwen2":  # split the vocabulary (512) into parts as a 49152-token vocabulary is split at 16384
            mp.setattr(ane_model, "MAX_DIM", 200)
        single = export_coreml(qm, d / "single.mlpackage", context=CTX, prefill_len=PREFILL)
        # llama: embedding | layer 0 | layer 1 | head; qwen2: embedding | layers 0-1 (one state) | head
        chunked = export_coreml(qm, d / "chunked", context=CTX, prefill_len=PREFILL, chunks=2 if arch == "llama" else 1)
    return arch, qm, single, chunked


def test_chunked_two_function_export_matches_transformers_and_single(exports):
    arch, qm, single, chunked = exports
    with torch.no_grad():
        ref = qm.to_torch(torch.float32)(torch.from_numpy(IDS)[None]).logits[0].numpy()
    one, many = _logits(single.path), _logits(chunked.path)
    err = np.abs(many - ref).max()
    assert err < TOL, (arch, err)
    assert np.array_equal(one, many)
    want = [[0, 0], [0, 1], [1, 2], [2, 2]] if arch == "llama" else [[0, 0], [0, 2], [2, 2]]
    assert [c["layers"] for c in chunked.chunks] == want
    m, _ = read_manifest(chunked.path)
    assert m.vocab_parts == ([[0, 176], [176, 352], [352, 512]] if arch == "qwen2" else [[0, 512]])


def test_default_export_passes_the_ane_gate(exports):
    _, _, single, chunked = exports
    assert single.ane_report[0] == "ANE gate: no findings" and chunked.ane_report[-1] == "ANE gate: no findings"
    for c in single.chunks + chunked.chunks:
        prog, spec = load_program(c["path"])
        assert sorted(prog.functions) == ["decode", "prefill"]
        assert ane_findings(prog, spec) == [], c["path"]
        # the export reports on its in-memory program; the package read back must say the same
        info = inspect_mlpackage(c["path"], loaded=(prog, spec))
        assert (c["ane_findings"], c["bytes"]) == (info["ane_findings"], info["bytes_on_disk"])
        for f in spec.description.functions:
            shapes = {i.name: list(i.type.multiArrayType.shape) for i in f.input}
            n = PREFILL if f.name == "prefill" else 1
            assert shapes.get("causal_mask", [1, 1, n, CTX]) == [1, 1, n, CTX]
            assert [s.name for s in f.state] == (["key_cache", "value_cache"] if "causal_mask" in shapes else [])
    info = inspect_mlpackage(single.path)
    assert (single.ops, single.bits_per_weight) == (info["ops"], info["bits_per_weight"])


def _h(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1]))
    return hashlib.blake2b(a.view(np.uint16).tobytes() + str(a.shape).encode(), digest_size=16).hexdigest()


def test_weights_read_back_from_every_chunk_equal_the_records(exports):
    arch, qm, single, chunked = exports
    m, root = read_manifest(chunked.path)
    placed = set()
    with pytest.MonkeyPatch.context() as mp:
        if arch == "qwen2":
            mp.setattr(ane_model, "MAX_DIM", 200)
        parts = ane_model.ane_shape(qm).vocab_parts
    for plan in m.chunks:
        prog, _ = load_program(root / plan.path)
        want = {_h(r.dequantize(torch.float32).half().numpy()): n for n, r in chunk_records(qm, plan, parts).items()}
        for fn in ("prefill", "decode"):
            got = {_h(np.asarray(c["op"].materialized_val_inference())) for c in weight_chains(prog, fn)}
            assert got == set(want), (plan.path, fn)
        placed |= {n.split("[")[0] for n in want.values()}
    assert placed == set(qm.records)


def test_functions_share_one_copy_of_the_weights(exports):
    _, _, single, _ = exports
    prog, _ = load_program(single.path)
    f = prog.functions["decode"]
    compressed = sum(c["bits"] for c in weight_chains(prog, "decode")) // 8
    fp16 = sum(op.outputs[0].val.nbytes for op in f.operations if op.op_type == "const" and op.outputs[0].rank >= 1
               and op.outputs[0].val is not None and op.outputs[0].val.dtype == np.float16)
    blob = (single.path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size
    assert blob < 1.3 * (compressed + fp16), (blob, compressed, fp16)   # two copies would be ~2x


def test_perplexity_driver_and_context_limit(exports):
    """The graph check scores macq's evaluation windows (as the torch evaluator does), through prefill and
    decode, and with a reference gives the KL / top-1 the torch evaluator gives on the same windows."""
    from macq.eval.agreement import agreement
    from macq.eval.perplexity import perplexity

    arch, qm, single, _ = exports
    if arch != "llama":
        pytest.skip("one architecture is enough for the driver")
    toks = np.random.default_rng(0).integers(0, 512, size=2 * CTX + 5)
    q, fp = qm.to_torch(torch.float32).eval(), tiny_model(arch, seed=3).eval()
    ids = torch.from_numpy(toks)
    want_ppl = perplexity(q, ids, context=CTX)
    want = agreement(fp, q, ids, context=CTX)

    def ref(win):
        with torch.no_grad():
            return fp(torch.from_numpy(win)[None]).logits[0].numpy()

    out = predict_ane(single.path, toks, backend="mil", prefill=12, reference=ref)
    assert out.n_tokens == want_ppl.n_tokens == 2 * CTX + 4 - 2, out.n_tokens   # windows [0,32) [32,64) [64,69)
    assert out.notes and abs(out.perplexity - want_ppl.ppl) / want_ppl.ppl < 5e-3, (out.perplexity, want_ppl.ppl)
    assert abs(out.ppl_stderr - want_ppl.stderr) / want_ppl.stderr < 2e-2, (out.ppl_stderr, want_ppl.stderr)
    assert want.kl > 1e-3 and abs(out.kl - want.kl) / want.kl < 5e-2, (out.kl, want.kl)
    assert abs(out.top1 - want.top1) <= 2 / want.n_tokens, (out.top1, want.top1)
    assert out.decode_ms_per_token is not None
    allp = predict_ane(single.path, toks, backend="mil", decode=0)
    assert allp.decode_ms_per_token is None and abs(allp.perplexity - out.perplexity) / out.perplexity < 5e-3
    with pytest.raises(MacqError, match="fixed context"):
        predict_ane(single.path, toks, backend="mil", context=CTX + 1)
    s = AneSession(single.path, backend="mil")
    s.feed(toks[:CTX])
    with pytest.raises(MacqError, match="context"):
        s.feed(toks[:1])


@pytest.mark.parametrize("vocab", [512, 16384, 32000, 49152, 128256, 151936])
def test_vocab_parts_stay_under_the_ane_limits(vocab):
    from converters.ane_report import LARGE_GATHER, MAX_ANE_DIM

    s = ane_model.AneShape(64, 4, 2, 16, 128, 2, vocab, 1e-5, False, False)
    parts = s.vocab_parts
    assert parts[0][0] == 0 and parts[-1][1] == vocab and all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))
    assert all(b - a < min(LARGE_GATHER, MAX_ANE_DIM) for a, b in parts)
    assert all(a % 16 == 0 for a, _ in parts) and len(parts) == (1 if vocab < 16384 else len(parts))


def test_slice_rows_is_exact():
    w = torch.randn(96, 64)
    for rec in (uniform_lut_record(w, 4, 16), uniform_lut_record(w, 3), nf4_record(w, 32, False),
                affine_record(w, 4, 32, "asym"), affine_record(w, 8, None, "sym"), affine_record(w, 4, 32, "bias")):
        whole = rec.dequantize()
        assert torch.equal(torch.cat([slice_rows(rec, a, b).dequantize() for a, b in ((0, 32), (32, 96))]), whole)
    with pytest.raises(MacqError, match="split a LUT group"):
        slice_rows(uniform_lut_record(w, 4, 16), 0, 40)


def test_chunk_plans_and_bad_arguments(tmp_path):
    qm = _qm("llama")
    assert [(p.start, p.stop, p.embed, p.head) for p in plan_chunks(qm, None, None)] == [(0, 2, True, True)]
    per_layer = plan_chunks(qm, 2, None)[1].est_bytes
    with pytest.MonkeyPatch.context() as mp:   # the float embedding (64 KiB) alone, so layers split one by one
        mp.setattr(chunks_mod, "_check_sizes", lambda *a: None)
        assert [(p.start, p.stop) for p in plan_chunks(qm, None, per_layer / 2**20)] == [(0, 0), (0, 1), (1, 2), (2, 2)]
    with pytest.raises(MacqError, match=r"--max-chunk-mb .*: the embedding vocabulary part 0 alone would hold"):
        plan_chunks(qm, None, per_layer / 2**20)   # over the limit, one package: refused before converting
    with pytest.MonkeyPatch.context() as mp:   # a single package over the weight-file limit: refused
        mp.setattr(chunks_mod, "MAX_FILE_MB", 0.05)
        with pytest.raises(MacqError, match="weight-file limit of one package"):
            plan_chunks(qm, None, None)
        with pytest.raises(MacqError, match="the 0.05 MB weight-file limit: the embedding vocabulary part 0 alone"):
            plan_chunks(qm, 1, None)
    assert [(p.start, p.stop) for p in plan_chunks(qm, None, 100.0)] == [(0, 0), (0, 2), (2, 2)]
    with pytest.raises(MacqError, match="--chunks 3"):
        plan_chunks(qm, 3, None)
    with pytest.raises(MacqError, match="give one of them"):
        plan_chunks(qm, 1, 1.0)
    with pytest.raises(MacqError, match="prefill_len=64"):
        export_coreml(qm, tmp_path / "a.mlpackage", context=CTX, prefill_len=64)
    with pytest.raises(MacqError, match="drop .mlpackage"):
        export_coreml(qm, tmp_path / "a.mlpackage", context=CTX, chunks=2)
    with pytest.raises(MacqError, match="graph='ane' only"):
        export_coreml(qm, tmp_path / "a.mlpackage", context=CTX, graph="hf", chunks=2)
    with pytest.raises(MacqError, match="graph='hf'"):
        export_coreml(qm, tmp_path / "a.mlpackage", context=CTX, stateful=False)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(MacqError, match="model_type 'gpt2'"):
        export_coreml(QuantizedModel.from_model(gpt2, {}), tmp_path / "g.mlpackage", context=CTX)
    assert list(tmp_path.iterdir()) == []


def test_qwen3_qk_norm_graph_matches_transformers():
    """Qwen3's per-head q/k RMSNorm in the ANE graph, checked in torch against transformers (float64)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from converters.wrapper import causal_mask

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    for n, p in model.named_parameters():
        if n.endswith("norm.weight"):
            p.data = 1 + 0.3 * torch.randn_like(p)
    qm = QuantizedModel.from_model(model, {})
    chunk = ane_model.AneChunk(qm, 0, 2, True, True, CTX).double()
    ids = torch.from_numpy(IDS[:6])
    with torch.no_grad():
        ref = model.double()(ids[None]).logits[0]
        got = chunk(ids[None].int(), torch.arange(6, dtype=torch.int32),
                    torch.from_numpy(causal_mask(6, 0, CTX, np.float64)))[0][0]
    # the RoPE tables are float32 (stored as fp16 in the export): agreement to ~1e-6, not float64 round-off
    assert chunk.s.qk_norm and torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()

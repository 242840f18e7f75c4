"""The Core AI target: records → ``.aimodel`` (prefill + decode, stateful, fixed shapes, chunks), checked on Linux.

Three independent references:

* the Core AI runtime itself runs the saved asset (``AIModelAsset.executable()`` lowers it to ODIX and loads it
  on the CPU), against transformers' own model on the same dequantized weights in fp32; the asset computes in
  fp16, so logits agree to 3e-2 (observed ~8e-3 on logits of magnitude ~3.5);
* the exported torch program (coreai's custom ops run their torch implementations) against the same reference;
* the weights decoded from the asset's program text (:mod:`coreai_backend.readback`) against the records.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import converters.ane_model as ane_model
from converters.chunks import plan_chunks
from converters.multifunction import chunk_records
from converters.synthetic import affine_record, nf4_record, uniform_lut_record
from coreai_backend import CoreAIOptions, check_coreai, export_coreai, read_manifest
from coreai_backend.readback import read_back
from coreai_backend.runner import CoreAISession
from macq.errors import MacqError
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.tiny import tiny_config, tiny_model

CTX, PREFILL, TOL = 32, 8, 3e-2
IDS = np.array([11, 250, 3, 77, 5, 9, 100, 200, 300, 1, 2, 3, 4, 5, 6], dtype=np.int64)  # 11 prompt + 4 decode


def _fp16(rec):
    """The record with its float constants rounded to fp16 (what macq's quantizers write for export)."""
    kw = {k: getattr(rec, k).half().float() for k in ("scales", "biases") if getattr(rec, k, None) is not None}
    return dataclasses.replace(rec, **kw) if kw else rec


LAYER0 = {  # every layout: int zero, symmetric per-channel int8, 3-bit grouped LUT (uint4), 5-bit LUT (uint6),
    # 2-bit symmetric, LUT × block scale, MLX bias form
    "self_attn.q_proj": lambda w: affine_record(w, 4, 32, "asym"),
    "self_attn.k_proj": lambda w: affine_record(w, 8, None, "sym"),
    "self_attn.v_proj": lambda w: uniform_lut_record(w, 3, 16),
    "self_attn.o_proj": lambda w: uniform_lut_record(w, 5, None),
    "mlp.gate_proj": lambda w: affine_record(w, 2, 16, "sym"),
    "mlp.up_proj": lambda w: nf4_record(w, 64, True),
    "mlp.down_proj": lambda w: affine_record(w, 4, 32, "bias"),
}


def _qm(arch: str) -> QuantizedModel:
    model = tiny_model(arch, seed=3)
    recs = {}
    for n, m in quantizable_modules(model).items():
        w = get_weight(m).detach().float()
        suffix = n.split("model.layers.0.")[-1]
        recs[n] = _fp16(LAYER0[suffix](w) if n.startswith("model.layers.0.") else affine_record(w, 4, 32, "asym"))
    if arch == "qwen2":  # tied: the embedding record (per-grouped-channel LUT) is also the head's
        recs["model.embed_tokens"] = uniform_lut_record(model.model.embed_tokens.weight.detach().float(), 4, 16)
    else:
        recs["lm_head"] = uniform_lut_record(model.lm_head.weight.detach().float(), 4, 16)
    return QuantizedModel.from_model(model, recs, source="tiny")


def _reference(qm: QuantizedModel) -> np.ndarray:
    with torch.no_grad():
        return qm.to_torch()(torch.from_numpy(IDS)[None]).logits[0].numpy()


def _runtime_logits(path) -> tuple[np.ndarray, list[str]]:
    with CoreAISession(path) as s:
        got = np.concatenate([s.feed(IDS[:11]), s.feed(IDS[11:], prefill=False)])
        return got, [k for k, _ in s.timing.calls]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exports(request, tmp_path_factory):
    arch = request.param
    qm = _qm(arch)
    d = tmp_path_factory.mktemp(f"coreai_{arch}")
    with pytest.MonkeyPatch.context() as mp:
        if arch == "qwen2":  # split the vocabulary (512) into parts as a 49152-token vocabulary is split at 16384
            mp.setattr(ane_model, "MAX_DIM", 200)
        single = export_coreai(qm, d / "single.aimodel", CoreAIOptions(context=CTX, prefill_len=PREFILL, hardware="gpu"))
        # llama: embedding | layer 0 | layer 1 | head; qwen2: embedding | layers 0-1 (one state) | head
        chunked = export_coreai(qm, d / "chunked", CoreAIOptions(context=CTX, prefill_len=PREFILL,
                                                                   chunks=2 if arch == "llama" else 1))
    return arch, qm, single, chunked


def test_runtime_runs_the_asset_like_transformers_single_and_chunked(exports):
    arch, qm, single, chunked = exports
    ref = _reference(qm)
    got, calls = _runtime_logits(single.path)
    assert calls == ["prefill", "prefill"] + ["decode"] * 4      # 8 + padded 3, then 4 one-token steps
    err = np.abs(got - ref).max()
    assert err < TOL, (arch, err)
    assert np.abs(ref).max() > 1.0                                # logits of a size where the tolerance means something
    got_c, _ = _runtime_logits(chunked.path)
    assert np.abs(got_c - ref).max() < TOL
    # the chunk boundary only moves an fp16 hidden state from one program to the next
    assert np.abs(got_c - got).max() <= 2e-3, np.abs(got_c - got).max()
    assert len(chunked.chunks) == (4 if arch == "llama" else 3)


def test_manifest_metadata_and_functions(exports):
    arch, qm, single, chunked = exports
    m, _ = read_manifest(single.path)
    assert m.functions == ["prefill", "decode"] and m.context == CTX and m.prefill_len == PREFILL
    assert m.extra["hardware"] == "gpu" and len(m.chunks) == 1 and m.chunks[0].path == "single.aimodel"
    meta = json.loads((single.path / "metadata.json").read_text())["creatorDefinedMetadata"]
    assert meta["macq.hardware"] == "gpu" and meta["macq.source"] == "tiny"
    mc, root = read_manifest(chunked.path)
    assert [c.path for c in mc.chunks][0] == "00_embed.aimodel" and root == chunked.path
    if arch == "qwen2":
        assert [list(p) for p in mc.vocab_parts] == [[0, 176], [176, 352], [352, 512]]


def test_weights_read_back_bit_exact_and_stored_once(exports):
    arch, qm, single, chunked = exports
    n_lut = sum(1 for r in qm.records.values() if r.kind == "lut")
    with pytest.MonkeyPatch.context() as mp:
        if arch == "qwen2":
            mp.setattr(ane_model, "MAX_DIM", 200)
        for out in (single, chunked):
            rb = read_back(out.path, qm)
            assert rb.functions == ["prefill", "decode"]
            # every record in each function, nothing else; a tied head may decompress the embedding's record again
            # (the same stored constants: the converter may or may not merge the two ops)
            tied_uses = len(ane_model.ane_shape(qm).vocab_parts) if arch == "qwen2" else 0
            assert 2 * rb.n_records <= rb.n_stored <= 2 * (rb.n_records + tied_uses)
            assert rb.dense_copies == []                     # no fp16 copy of a quantized weight
            assert "lut_to_dense" in rb.op_distribution and "blockwise_shift_scale" in rb.op_distribution
    rb = read_back(single.path, qm) if arch == "llama" else None
    if rb is not None:
        # one copy of each weight although two functions use it: sub-byte storage counted once
        assert rb.op_distribution["lut_to_dense"] == 2 * n_lut
        lut4 = [r for k, r in qm.records.items() if r.kind == "lut" and r.bits in (3, 4)]  # 3-bit held in uint4
        assert rb.storage_types["UInt4"] == sum(r.indices.numel() for r in lut4)
        o = qm.records["model.layers.0.self_attn.o_proj"]
        assert rb.storage_types["UInt6"] == o.indices.numel()
        gate = qm.records["model.layers.0.mlp.gate_proj"]
        assert rb.storage_types["Int2"] == gate.codes.numel()
        assert single.bytes_on_disk < 1.5 * sum(r.storage_bits() for r in qm.records.values()) / 8 + 120_000


def test_read_back_detects_a_changed_record(exports):
    arch, qm, single, _ = exports
    if arch != "llama":
        pytest.skip("one architecture is enough")
    name = "model.layers.1.mlp.up_proj"
    rec = qm.records[name]
    codes = rec.codes.clone()
    codes[0, 0] = (int(codes[0, 0]) + 1) % 16
    other = dataclasses.replace(qm, records={**qm.records, name: dataclasses.replace(rec, codes=codes)})
    with pytest.raises(MacqError, match=r"record model\.layers\.1\.mlp\.up_proj not found bit-exact"):
        read_back(single.path, other)


def test_exported_program_runs_in_torch_like_transformers():
    """The very program handed to the converter (torch.export + coreai decompositions + the unit-matmul rewrite),
    run in torch with coreai's custom-op implementations, for both functions."""
    import coreai_torch

    from converters.wrapper import causal_mask
    from coreai_backend.model import coreai_chunk, example_inputs, rewrite_unit_matmuls

    qm = _qm("llama")
    ref = _reference(qm)
    s = ane_model.ane_shape(qm)
    plan = plan_chunks(qm, None, None)[0]
    chunk = coreai_chunk(qm, plan, CTX, chunk_records(qm, plan, s.vocab_parts))
    table = coreai_torch.get_decomp_table()
    progs = {n: rewrite_unit_matmuls(torch.export.export(chunk, example_inputs(chunk, n)).run_decompositions(table))
             for n in (PREFILL, 1)}
    ops = {str(node.target) for node in progs[1].graph.nodes if node.op == "call_function"}
    assert "coreai.lut_to_dense.default" in ops and "coreai.constexpr_blockwise_shift_scale.default" in ops
    assert "aten.bmm.default" in ops                                 # attention keeps its matmuls
    mod = {n: p.module() for n, p in progs.items()}
    got = []
    with torch.no_grad():
        ids = torch.from_numpy(IDS[:PREFILL]).to(torch.int32)[None]
        pos = torch.arange(PREFILL, dtype=torch.int32)
        got.append(mod[PREFILL](ids, pos, torch.from_numpy(causal_mask(PREFILL, 0, chunk.kv_len)))[0][0].float().numpy())
        for t in range(PREFILL, IDS.size):
            one = mod[1](torch.tensor([[IDS[t]]], dtype=torch.int32), torch.tensor([t], dtype=torch.int32),
                         torch.from_numpy(causal_mask(1, t, chunk.kv_len)))
            got.append(one[0][0].float().numpy())
    err = np.abs(np.concatenate(got) - ref).max()
    assert err < TOL, err


# ------------------------------------------------------------------------------------------- refusals

def test_check_coreai_refuses_before_any_weight():
    cfg = tiny_config("llama")
    assert check_coreai(cfg, None, CoreAIOptions(context=32)) == []
    with pytest.raises(MacqError, match=r"model_type 'gpt2': the Core AI target supports the Llama family"):
        check_coreai(tiny_config("gpt2"), None, CoreAIOptions())
    with pytest.raises(MacqError, match=r"--context 1024: expected an int in \[2, 256\]"):
        check_coreai(cfg, None, CoreAIOptions(context=1024))
    with pytest.raises(MacqError, match=r"--chunks 3: expected an int in \[1, 2\]"):
        check_coreai(cfg, None, CoreAIOptions(context=32, chunks=3))
    with pytest.raises(MacqError, match="activation quantization cannot be expressed"):
        check_coreai(cfg, "affine", CoreAIOptions(context=32), activations=True)
    from macq.quantizers import make_config

    with pytest.raises(MacqError, match="--double-quant|NF4/FP4"):
        check_coreai(cfg, "lut", CoreAIOptions(context=32), make_config("nf4"))
    notes = check_coreai(cfg, "affine", CoreAIOptions(context=32), make_config("rtn", bits=3, group_size=32))
    assert notes == ["--bits 3: stored in Core AI's 4-bit type (exact, 4 bits per code)"]


def test_options_validate_and_round_trip():
    o = CoreAIOptions(context=64, prefill_len=16, max_chunk_mb=5.0, hardware="neural_engine")
    assert CoreAIOptions.from_dict(o.to_dict()) == o and o.block == 16 and o.chunked
    assert CoreAIOptions(context=40).block == 40 and CoreAIOptions().block == 64
    with pytest.raises(MacqError, match=r"--hardware 'npu': expected one of any, neural_engine, gpu"):
        CoreAIOptions(hardware="npu")
    with pytest.raises(MacqError, match=r"--prefill-len 65: expected an int in \[1, context=64\]"):
        CoreAIOptions(context=64, prefill_len=65)
    with pytest.raises(MacqError, match="--chunks and --max-chunk-mb: give one of them"):
        CoreAIOptions(chunks=2, max_chunk_mb=3)
    with pytest.raises(MacqError, match="unknown bits"):
        CoreAIOptions.from_dict({"bits": 4})


def test_export_refuses_before_writing(tmp_path):
    qm = _qm("llama")
    opts = CoreAIOptions(context=CTX, prefill_len=PREFILL)
    with pytest.raises(MacqError, match=r"must end in \.aimodel"):
        export_coreai(qm, tmp_path / "x.mlpackage", opts)
    user = tmp_path / "mine.aimodel"
    user.mkdir()
    (user / "keep.txt").write_text("user data")
    with pytest.raises(MacqError, match="exists \\(pass --force"):
        export_coreai(qm, user, opts)
    with pytest.raises(MacqError, match="not a macq Core AI export; --force only replaces macq outputs"):
        export_coreai(qm, user, dataclasses.replace(opts, force=True))
    assert (user / "keep.txt").read_text() == "user data"
    # a record whose scales are not fp16 values would be changed by the export: refused, nothing written
    name = "model.layers.1.self_attn.q_proj"
    bad = dataclasses.replace(qm.records[name], scales=qm.records[name].scales + 1e-5)
    qm_bad = dataclasses.replace(qm, records={**qm.records, name: bad})
    with pytest.raises(MacqError, match=rf"record {name}: scales are not fp16 values"):
        export_coreai(qm_bad, tmp_path / "bad.aimodel", opts)
    assert not (tmp_path / "bad.aimodel").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mine.aimodel"]   # no temp dir left behind


def test_target_table_precheck_and_options(tmp_path):
    """The adapters the target table calls: ``precheck(plan)`` on config and options alone, ``options_from``."""
    from types import SimpleNamespace

    from coreai_backend.export import options_from, precheck
    from macq.quantizers import make_config

    cfg = tiny_config("llama")

    def plan(output, method="rtn", qcfg=None, **topts):
        o = {"context": None, "prefill_len": None, "chunks": None, "max_chunk_mb": None, "hardware": "any", **topts}
        return SimpleNamespace(target_options=o, request=SimpleNamespace(output=str(output)), config=cfg,
                               method=method, cfg=qcfg)

    precheck(plan(tmp_path / "m.aimodel", qcfg=make_config("rtn", bits=4, group_size=32)))
    precheck(plan(tmp_path / "dir", chunks=2))
    with pytest.raises(MacqError, match=r"must end in \.aimodel"):
        precheck(plan(tmp_path / "m.mlpackage"))
    with pytest.raises(MacqError, match=r"a chunked export is a directory of assets"):
        precheck(plan(tmp_path / "m.aimodel", max_chunk_mb=10.0))
    with pytest.raises(MacqError, match="activation quantization cannot be expressed"):
        precheck(plan(tmp_path / "m.aimodel", method="smoothquant", qcfg=make_config("smoothquant")))
    assert options_from({"context": None}, cfg).context == 256           # the tiny model's maximum (< 512)
    assert options_from({"context": 64, "hardware": "gpu"}).hardware == "gpu"


def test_cli_exports_through_the_target_table(tmp_path, capsys):
    """``macq export --target coreai`` is one row of the target table: the planner streams the records into a scratch
    quantization, the row's writer exports them, the asset reads back bit-exact against the records, ``--force``
    replaces only a macq asset, and an option of another target is refused by name."""
    from macq.atomic import macq_artifact
    from macq.cli import main
    from macq.qmodel import QuantizedModel
    from macq.tiny import save_tiny_model

    src = save_tiny_model(tmp_path / "tiny", "llama")
    main(["quantize", str(src), "--bits", "4", "--group-size", "32", "--target", "coreai", "-o", str(tmp_path / "q")])
    capsys.readouterr()
    main(["export", str(tmp_path / "q"), "--target", "coreai", "-o", str(tmp_path / "m.aimodel"), "--hardware", "gpu",
          "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["target"] == "coreai" and res["plan"]["route"] == "read" and res["plan"]["target_options"]["hardware"] == "gpu"
    assert macq_artifact(tmp_path / "m.aimodel") == "coreai"
    rb = read_back(tmp_path / "m.aimodel", QuantizedModel.load(tmp_path / "q"))
    assert rb.functions == ["prefill", "decode"] and rb.dense_copies == [] and rb.n_records == 14
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "q"), "--target", "coreai", "-o", str(tmp_path / "m2.aimodel"), "--graph", "hf"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --graph does not apply to --target coreai (it is an option of coreml)\n"
    (tmp_path / "user.aimodel").mkdir()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "q"), "--target", "coreai", "-o", str(tmp_path / "user.aimodel"), "--force"])
    assert "was not written by macq" in capsys.readouterr().err and not any((tmp_path / "user.aimodel").iterdir())


def test_cli_eval_runs_the_asset_in_the_runtime(tmp_path, capsys):
    """``macq eval X.aimodel`` scores the asset through the Core AI runtime (prefill + decode + state, as
    deployed) on the same windows as the torch evaluation of the records it holds: equal within fp16."""
    from macq.cli import main
    from macq.tiny import save_tiny_model

    src = save_tiny_model(tmp_path / "tiny", "llama")
    main(["quantize", str(src), "--bits", "4", "--group-size", "32", "--target", "coreai", "-o", str(tmp_path / "q")])
    main(["export", str(tmp_path / "q"), "--target", "coreai", "-o", str(tmp_path / "m.aimodel"), "--context", "64"])
    capsys.readouterr()
    common = ["--dataset", "tinystories", "--max-tokens", "128", "--context", "64", "--json"]
    main(["eval", str(tmp_path / "m.aimodel"), "--reference", str(src), "--decode-tokens", "16", *common])
    got = json.loads(capsys.readouterr().out)
    main(["eval", str(tmp_path / "q"), *common])
    want = json.loads(capsys.readouterr().out)
    assert got["artifact"] == "coreai" and got["context"] == 64 and got["n_tokens"] == want["n_tokens"] > 100
    assert abs(got["ppl"] / want["ppl"] - 1) < 5e-3, (got["ppl"], want["ppl"])
    assert abs(got["kl"] - want["kl"]) < 5e-3 and got["decode_ms_per_token"] > 0
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "m.aimodel"), "--context", "65"])
    assert capsys.readouterr().err == "error: --context 65: expected 2..64 (the export's fixed context)\n"

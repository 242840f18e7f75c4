"""Integrity of macq's files and of a request's selections, checked against independent references:
``hashlib`` over the bytes on disk, ``quantizable_modules`` / ``QuantConfig.for_module`` for what a selection
selects, transformers' own tokenizer for the vocabulary size."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch

from macq.errors import MacqError
from macq.integrity import check_config_selection, check_safetensors_dir, check_selection, check_tokenizer
from macq.record import AffineRecord, DoubleQuant, LUTRecord, record_from_tensors
from macq.shards import CHECKSUMS, ShardWriter, TensorStore


# ----------------------------------------------------------------------------------------- checksums
def _write(d, n_tensors=6, shard_bytes=5000, **kw):
    g = torch.Generator().manual_seed(0)
    ts = {f"t{i}": torch.randn(40 + i, 16, generator=g) for i in range(n_tensors)}   # ~2.6 KB each: 3 shards
    w = ShardWriter(d, "records", shard_bytes, **kw)
    w.add_all(ts)
    paths = w.close()
    return ts, paths


def test_index_records_size_and_sha256_of_every_shard(tmp_path):
    ts, paths = _write(tmp_path)
    assert len(paths) > 2
    idx = json.loads((tmp_path / "records.safetensors.index.json").read_text())
    sums = idx["metadata"][CHECKSUMS]
    assert sorted(sums) == sorted(p.name for p in paths)
    for p in paths:
        assert sums[p.name] == {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    store = TensorStore.open(tmp_path, "records")
    for k, t in ts.items():
        assert torch.equal(store[k], t)


def test_a_changed_byte_is_refused_naming_the_shard(tmp_path):
    _, paths = _write(tmp_path)
    victim = paths[1]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x10                      # one bit of tensor data; the header is intact, so only the hash sees it
    victim.write_bytes(bytes(raw))
    with pytest.raises(MacqError, match=re.escape(str(victim)) + r": SHA-256 [0-9a-f]{16}\.\.\. differs"):
        TensorStore.open(tmp_path, "records")
    TensorStore.open(tmp_path, "records", verify=False)   # opt-out reads it (a caller that verified already)


def test_a_truncated_or_extended_shard_is_refused_by_its_size(tmp_path):
    _, paths = _write(tmp_path)
    with open(paths[0], "ab") as f:
        f.write(b"\0")
    with pytest.raises(MacqError, match=re.escape(paths[0].name) + r": \d+ bytes, records\.safetensors\.index\.json "
                       r"records \d+"):
        TensorStore.open(tmp_path, "records")


def test_a_shard_the_checksums_do_not_cover_is_refused(tmp_path):
    _, paths = _write(tmp_path)
    ip = tmp_path / "records.safetensors.index.json"
    idx = json.loads(ip.read_text())
    del idx["metadata"][CHECKSUMS][paths[0].name]
    ip.write_text(json.dumps(idx))
    with pytest.raises(MacqError, match=re.escape(paths[0].name) + ": no size/sha256 recorded"):
        TensorStore.open(tmp_path, "records")


def test_an_index_without_checksums_still_loads(tmp_path):
    """A directory from an older writer (index with total_size and weight_map only) is read unverified."""
    ts, _ = _write(tmp_path)
    ip = tmp_path / "records.safetensors.index.json"
    idx = json.loads(ip.read_text())
    del idx["metadata"][CHECKSUMS]
    ip.write_text(json.dumps(idx))
    store = TensorStore.open(tmp_path, "records")
    assert all(torch.equal(store[k], t) for k, t in ts.items())


def test_old_quantization_dir_without_checksums_loads_and_matches(tmp_path):
    from macq.pipeline import quantize
    from macq.qmodel import QuantizedModel
    from macq.tiny import tiny_model, tiny_tokenizer

    qm = quantize(tiny_model("llama"), tiny_tokenizer(), "rtn", {"bits": 3, "group_size": 32})
    new = qm.save(tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    for stem in ("records", "float"):
        ip = old / f"{stem}.safetensors.index.json"
        idx = json.loads(ip.read_text())
        del idx["metadata"][CHECKSUMS]
        ip.write_text(json.dumps(idx))
    a, b = QuantizedModel.load(new), QuantizedModel.load(old)
    for k in qm.records:
        assert torch.equal(a.records[k].dequantize(), b.records[k].dequantize())
        assert torch.equal(a.records[k].dequantize(), qm.records[k].dequantize())


# ----------------------------------------------------------------------------------------- record meta vs tensors
def _affine(out=4, inp=8, bits=4, group=8, **kw):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2 ** bits, (out, inp), generator=g)
    codes[:, -1] = 2 ** bits - 1           # the top code bit is set in every row's last code
    return AffineRecord(codes=codes, scales=torch.rand(out, inp // group, generator=g) + 0.1, bits=bits,
                        group_size=group, **kw)


@pytest.mark.parametrize("true_bits", range(1, 9))
def test_every_bits_lie_is_refused(true_bits):
    """With 96 inputs (3·32, as every real hidden size is a multiple of 32) each width packs into its own word
    count (3·bits), so any other ``bits`` is refused by the stored shape alone; the truth round-trips."""
    rec = _affine(inp=96, group=32, bits=true_bits)
    t = rec.to_tensors()
    assert torch.equal(record_from_tensors(rec.meta(), t).codes, rec.codes)
    for lie in set(range(1, 9)) - {true_bits}:
        with pytest.raises(MacqError, match=rf"manifest bits={lie}, shape \[4, 96\] disagree with the stored codes: "
                           rf"{3 * true_bits} words per row of 96 codes is {true_bits} bits"):
            record_from_tensors(dict(rec.meta(), bits=lie), t)


def test_bits_lie_in_a_shared_word_is_caught_by_the_padding():
    """8 inputs at 1..4 bits all pack into one word; codes stored at 4 bits and claimed at 1..3 leave nonzero
    bits past the claimed stream. (Claiming *more* bits than stored reads zeros there: that lie cannot be
    told from the file when the widths share a word, which needs in·bits < 32, i.e. no real model.)"""
    rec = _affine(inp=8, bits=4)
    for lie in (1, 2, 3):
        with pytest.raises(MacqError, match=rf"stored codes: nonzero bits after the last of 8 codes per row: they were "
                           rf"not written at the manifest's bits={lie}"):
            record_from_tensors(dict(rec.meta(), bits=lie), rec.to_tensors())


@pytest.mark.parametrize("field,value,match", [
    ("group_size", 4, r"stored scales has shape \[4, 1\], the manifest \(group_size=4 over 8 inputs\) implies \[4, 2\]"),
    ("group_size", 3, r"group_size=3 does not divide the input dim 8"),
    ("group_size", 0, r"manifest group_size=0, expected an int >= 1"),
    ("shape", [4, 16], r"manifest bits=4, shape \[4, 16\] disagree with the stored codes"),
    ("shape", [2, 8], r"stored codes has shape \[4, 1\], the manifest .* implies \[2, 1\]"),
    ("shape", [4], r"manifest shape=\[4\], expected \[out, in\]"),
    ("per_tensor", True, r"stored scales .* \(per_tensor\) implies \[1, 1\]"),
    ("per_tensor", "yes", r"per_tensor='yes', expected true or false"),
    ("bits", True, r"manifest bits=True"),
    ("kind", "lut", r"stored tensor codes does not belong to a lut record"),
    ("kind", "gguf", r"unknown record kind 'gguf'"),
])
def test_affine_meta_lies(field, value, match):
    rec = _affine()
    with pytest.raises(MacqError, match=match):
        record_from_tensors(dict(rec.meta(), **{field: value}), rec.to_tensors())


def test_stored_tensor_lies():
    rec = _affine(biases=torch.zeros(4, 1))
    t = rec.to_tensors()
    with pytest.raises(MacqError, match="stored codes have dtype float32"):
        record_from_tensors(rec.meta(), dict(t, codes=t["codes"].float()))
    with pytest.raises(MacqError, match="no stored tensor scales"):
        record_from_tensors(rec.meta(), {k: v for k, v in t.items() if k != "scales"})
    with pytest.raises(MacqError, match="stored zeros and biases both"):
        record_from_tensors(rec.meta(), dict(t, zeros=torch.zeros(4, 1, dtype=torch.uint8)))
    with pytest.raises(MacqError, match="stored biases has shape"):
        record_from_tensors(rec.meta(), dict(t, biases=torch.zeros(4, 2)))


def _lut(out=4, inp=16, bits=3, groups=2, block=None, dq=False):
    g = torch.Generator().manual_seed(2)
    kw = {}
    if block is not None and not dq:
        kw = dict(scales=torch.rand(out, inp // block, generator=g) + 0.5, block_size=block)
    if dq:
        n = out * inp // block
        kw = dict(block_size=block, double_quant=DoubleQuant(codes=torch.randint(0, 256, (n,), dtype=torch.uint8),
                                                             code_lut=torch.linspace(-1, 1, 256),
                                                             absmax=torch.rand(-(-n // 4)) + 0.1, offset=0.5,
                                                             block_size=4))
    return LUTRecord(indices=torch.randint(0, 2 ** bits, (out, inp), generator=g),
                     lut=torch.randn(groups, 2 ** bits, generator=g), bits=bits, **kw)


@pytest.mark.parametrize("make,field,value,match", [
    (lambda: _lut(), "bits", 2, r"bits=2"),
    (lambda: _lut(), "bits", 4, r"bits=4"),
    (lambda: _lut(), "shape", [3, 16], r"stored indices has shape \[4, 2\]"),
    (lambda: _lut(block=8), "block_size", 4, r"stored scales has shape \[4, 2\], the manifest \(block_size=4"),
    (lambda: _lut(block=8), "block_size", None, r"block_size=None, but scales are stored"),
    (lambda: _lut(block=8, dq=True), "dq_block_size", 8,
     r"stored dq_absmax has shape \[2\], the manifest \(dq_block_size=8\) implies \[1\]"),
    (lambda: _lut(block=8, dq=True), "dq_offset", "x", r"dq_offset='x', expected a number"),
])
def test_lut_meta_lies(make, field, value, match):
    rec = make()
    t = rec.to_tensors()
    back = record_from_tensors(rec.meta(), t)            # the truth builds the same record
    assert torch.equal(back.dequantize(), rec.dequantize())
    with pytest.raises(MacqError, match=match):
        record_from_tensors(dict(rec.meta(), **{field: value}), t)


def test_quantization_dir_bits_lie_is_refused_at_load_naming_the_record(tmp_path):
    from macq.pipeline import quantize
    from macq.qmodel import QuantizedModel
    from macq.tiny import tiny_model, tiny_tokenizer

    qm = quantize(tiny_model("llama"), tiny_tokenizer(), "rtn", {"bits": 4, "group_size": 32})
    d = qm.save(tmp_path / "q")
    m = json.loads((d / "manifest.json").read_text())
    m["records"]["model.layers.1.mlp.down_proj"]["bits"] = 2
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MacqError, match=r"manifest\.json: record model\.layers\.1\.mlp\.down_proj: manifest bits=2"):
        QuantizedModel.load(d)


# ----------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from macq.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tok") / "tiny", "llama")


def test_check_tokenizer_accepts_the_model_and_returns_its_tokenizer(tiny_dir):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_dir)
    tok = check_tokenizer(tiny_dir, cfg)
    ref = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == len(ref) == cfg.vocab_size == 512
    assert tok("Once upon a time")["input_ids"] == ref("Once upon a time")["input_ids"]
    assert check_tokenizer(ref, cfg) is ref


def test_check_tokenizer_refusals(tiny_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_dir)
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    raw = (d / "tokenizer.json").read_bytes()
    (d / "tokenizer.json").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(MacqError, match=re.escape(str(d / "tokenizer.json")) + ": not valid JSON, truncated"):
        check_tokenizer(d, cfg)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(MacqError, match=r"tokenizer\.json: not a tokenizers file"):
        check_tokenizer(d, cfg)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(MacqError, match=r"tokenizer\.json: cannot load the tokenizer"):
        check_tokenizer(d, cfg)
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with pytest.raises(MacqError, match="has none of tokenizer.json, tokenizer.model, vocab.json"):
        check_tokenizer(d, cfg)
    with pytest.raises(MacqError, match="is not a model directory or a .gguf file"):
        check_tokenizer(tmp_path / "nope", cfg)
    big = AutoTokenizer.from_pretrained(tiny_dir)
    big.add_tokens([f"<x{i}>" for i in range(3)])
    with pytest.raises(MacqError, match=r"515 tokens, but the model's embedding has 512 rows"):
        check_tokenizer(big, cfg)
    cfg.vocab_size = 515
    assert check_tokenizer(big, cfg) is big      # exactly fitting is fine; fewer tokens than rows too


# ----------------------------------------------------------------------------------------- selections
@pytest.fixture(scope="module")
def names():
    from macq.models import quantizable_modules
    from macq.tiny import tiny_model

    return list(quantizable_modules(tiny_model("llama")))


def test_selection_semantics_match_the_quantizers(names):
    """``check_selection`` refuses a --skip value exactly when ``quantizable_modules`` drops nothing with it, and
    an --override exactly when ``QuantConfig.for_module`` applies it to no module."""
    from dataclasses import replace

    from macq.models import quantizable_modules
    from macq.quantizers.rtn import RTNConfig
    from macq.tiny import tiny_model

    model = tiny_model("llama")
    for s in ["q_proj", "Q_PROJ", "layers.1.", "mlp", "self_attn.o", "xyz", ".0.", "proj,"]:
        drops = len(quantizable_modules(model, skip=(s,))) < len(names)
        refused = False
        try:
            check_selection({"--skip": [s]}, names)
        except MacqError as e:
            refused = True
            assert str(e).startswith(f"--skip {s!r}: matches no module")
        assert refused != drops, s
    base = RTNConfig(bits=4, group_size=32)
    for pat in [r"q_proj", r"^model\.layers\.0\.", r"down_proj$", r"up_proj$x", r"LAYERS", r"(k|v)_proj", r"\.2\."]:
        cfg = replace(base, overrides=(f"{pat}=bits:8",))
        applied = any(cfg.for_module(n).bits == 8 for n in names)
        refused = False
        try:
            check_config_selection(cfg, names)
        except MacqError as e:
            refused = True
            assert str(e).startswith(f"--override {pat + '=bits:8'!r}: pattern")
        assert refused != applied, pat


def test_shadowed_override_skipped_target_and_layers(names):
    with pytest.raises(MacqError, match=r"--override 'q_proj=bits:2': every module it matches .* earlier --override"):
        check_selection({"overrides": ["proj=bits:8", "q_proj=bits:2"]}, names)
    check_selection({"overrides": ["q_proj=bits:8", "proj=bits:2"]}, names)       # the second still matches others
    with pytest.raises(MacqError, match=r"--override 'q_proj=bits:8'.*only modules that --skip keeps float"):
        check_selection({"skip": ["q_proj"], "overrides": ["q_proj=bits:8"]}, names)
    check_selection({"--layers": ["0,1"]}, names)
    check_selection({"--layers": ["1"]}, names, layers_prefix="model.layers")
    with pytest.raises(MacqError, match=r"--layers '0,2': no decoder layer 2 \(the model's layers: 0\.\.1\)"):
        check_selection({"--layers": ["0,2"]}, names)
    with pytest.raises(MacqError, match=r"--layers 'a': 'a' is not a decoder layer index"):
        check_selection({"--layers": ["a"]}, names)
    with pytest.raises(MacqError, match=r"unknown selection flag --only"):
        check_selection({"--only": ["x"]}, names)
    check_selection({"--skip": ["", "mlp"], "--override": []}, names)    # empty parts are dropped, as the CLI does


def test_check_safetensors_dir(tmp_path):
    ts, paths = _write(tmp_path)
    check_safetensors_dir(tmp_path, "records")                 # sound: passes
    with pytest.raises(MacqError, match="neither model.safetensors.index.json nor model.safetensors"):
        check_safetensors_dir(tmp_path)
    paths[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(MacqError, match=re.escape(paths[0].name) + r": \d+ bytes"):   # the index's size check
        check_safetensors_dir(tmp_path, "records")
    (tmp_path / "records.safetensors.index.json").unlink()
    single = tmp_path / "records.safetensors"
    single.write_bytes(paths[0].read_bytes())
    with pytest.raises(MacqError, match=re.escape(str(single)) + ": corrupt or truncated safetensors file"):
        check_safetensors_dir(tmp_path, "records")

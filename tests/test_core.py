"""Model loading, module selection, data sampling and the QuantizedModel container on tiny models."""

import json

import pytest
import torch

from macq.data import calibration_samples, eval_tokens, load_text
from macq.errors import MacqError
from macq.models import get_weight, load_model, quantizable_modules, set_weight, tied_embeddings
from macq.qmodel import QuantizedModel
from macq.quantizers.grid import affine_params, quantize_codes
from macq.record import AffineRecord
from macq.tiny import save_tiny_model, tiny_model, tiny_tokenizer


def _rtn_records(model, bits=4, g=32, include_embeddings=False):
    recs = {}
    for name, mod in quantizable_modules(model, include_embeddings=include_embeddings).items():
        w = get_weight(mod).detach().float()
        out, inp = w.shape
        wg = w.view(out, inp // g, g)
        s, z, b = affine_params(wg, bits, symmetric=False)
        recs[name] = AffineRecord(codes=quantize_codes(wg, s, z, b, bits).view(out, inp), scales=s.half(),
                                  zeros=z, bits=bits, group_size=g, transposed=type(mod).__name__ == "Conv1D")
    return recs


@pytest.mark.parametrize("arch,n", [("llama", 14), ("qwen2", 14), ("gpt2", 8)])
def test_quantizable_modules_cover_decoder_linears(arch, n):
    m = tiny_model(arch)
    mods = quantizable_modules(m)
    assert len(mods) == n
    for name, mod in mods.items():
        w = get_weight(mod)
        assert w.shape[1] == 64 or w.shape[1] == 128 or w.shape[1] == 256  # [out, in] orientation
    # GPT-2 Conv1D stores [in, out]: get_weight transposes, set_weight writes back transposed.
    if arch == "gpt2":
        mod = mods["transformer.h.0.attn.c_attn"]
        assert tuple(mod.weight.shape) == (64, 192) and tuple(get_weight(mod).shape) == (192, 64)
        new = torch.randn(192, 64)
        set_weight(mod, new)
        assert torch.equal(mod.weight, new.t())


def test_tied_embeddings_listed_once():
    q = tiny_model("qwen2")  # tie_word_embeddings=True
    assert tied_embeddings(q)
    mods = quantizable_modules(q, include_lm_head=True)
    assert "model.embed_tokens" in mods and "lm_head" not in mods
    assert "lm_head" in quantizable_modules(tiny_model("llama"), include_lm_head=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_quantized_model_roundtrip(tmp_path, arch):
    m = tiny_model(arch)
    recs = _rtn_records(m, include_embeddings=(arch == "qwen2"))
    qm = QuantizedModel.from_model(m, recs, method={"method": "test"})
    if arch == "qwen2":
        assert qm.tied == {"lm_head": "model.embed_tokens"}
    out = qm.save(tmp_path / "q", tokenizer=tiny_tokenizer())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 4 / 32)
    qm2 = QuantizedModel.load(out)
    model2 = qm2.to_torch()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    # Reference: the original model with weights replaced in place.
    qm.apply_to(m)
    if arch == "qwen2":
        m.tie_weights()
    torch.testing.assert_close(model2(ids).logits, m(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(MacqError, match="exists"):
        qm.save(out)


def test_save_is_atomic_on_failure(tmp_path):
    m = tiny_model("llama")
    qm = QuantizedModel.from_model(m, _rtn_records(m))

    class Boom:
        def save_pretrained(self, _):
            raise RuntimeError("tokenizer failed")

    with pytest.raises(RuntimeError):
        qm.save(tmp_path / "q", tokenizer=Boom())
    assert list(tmp_path.iterdir()) == []


def test_data_splits_are_disjoint_and_seeded():
    tok = tiny_tokenizer()
    a = calibration_samples(tok, "tinystories", 4, 64, seed=3)
    b = calibration_samples(tok, "tinystories", 4, 64, seed=3)
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert not torch.equal(a, calibration_samples(tok, "tinystories", 4, 64, seed=4))
    ev = eval_tokens(tok, "tinystories", max_tokens=256)
    assert ev.shape == (256,)
    text = load_text("tinystories")
    half = len(text) // 2
    assert tok.decode(ev[:20]) in text[:half]


def test_data_errors(tmp_path):
    with pytest.raises(MacqError, match="dataset"):
        load_text("no-such-dataset")
    empty = tmp_path / "e.txt"
    empty.write_text("   \n")
    with pytest.raises(MacqError, match="no text"):
        load_text(str(empty))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(MacqError, match="b.jsonl:2"):
        load_text(str(bad))
    good = tmp_path / "g.jsonl"
    good.write_text('{"text": "hello"}\n{"text": "world"}\n')
    assert load_text(str(good)) == "hello\n\nworld"


def test_load_model_local_dir_and_errors(tmp_path):
    d = save_tiny_model(tmp_path / "tiny", "llama")
    model, tok = load_model(str(d))
    assert model.config.model_type == "llama" and tok is not None
    with pytest.raises(MacqError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MacqError, match="config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("symmetric", [False, True])
def test_in_place_grid_equals_the_allocating_one(symmetric):
    """codes_into / dequantize_into (the searches' in-place rounding) give quantize_codes / dequantize_codes'
    values exactly, clamped codes included."""
    from macq.quantizers.grid import affine_params, codes_into, dequantize_codes, dequantize_into, quantize_codes

    w = torch.randn(6, 4, 32, generator=torch.Generator().manual_seed(0))
    s, z, _ = affine_params(w, 3, symmetric, clip=0.6)        # clipped range: some codes clamp
    su, zu = s.unsqueeze(-1), None if z is None else z.unsqueeze(-1)
    c = quantize_codes(w, s, z, None, 3)
    out = torch.empty_like(w)
    assert torch.equal(codes_into(w, su, zu, 3, out), c.float()) and (c == 0).any() and (c == 7).any()
    assert torch.equal(dequantize_into(out, su, zu, 3, out), dequantize_codes(c, s, z, None, 3))

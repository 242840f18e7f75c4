"""--head-gptq: the output head (or the tied embedding) by GPTQ on the quantized model's final hidden states."""

from __future__ import annotations

import pytest
import torch

from macq.data import calibration_samples
from macq.errors import MacqError
from macq.models import get_weight
from macq.quantizers import head_quantizer, make_config, quantize_model
from macq.quantizers.rtn import RTNConfig
from macq.record import AffineRecord, FPRecord
from macq.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def calib():
    return calibration_samples(tiny_tokenizer(), "tinystories", 8, 64, seed=0)


def _head_inputs(model, ids) -> torch.Tensor:
    """The lm_head's inputs recomputed independently: the final (normed) hidden states of the whole model."""
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states[-1]
    return hs.reshape(-1, hs.shape[-1]).double()


@pytest.mark.parametrize("method,mode", [("gptq", "mxfp4"), ("awq", "nvfp4"), ("gptq", "affine")])
def test_head_record_beats_data_free_on_head_output(calib, method, mode):
    """Untied head: its record's output error ‖X(Ŵ − W)ᵀ‖² on the quantized model's head inputs (recomputed in
    float64 from the record) is below the data-free record's (RTN with the scale search, what the head gets
    without the option), and equals the stat the method stores."""
    model = tiny_model("llama")
    w = get_weight(model.lm_head).detach().float().clone()
    kw = dict(group_size=32) if mode == "affine" else {}
    cfg = make_config(method, mode=mode, head_gptq=True, include_lm_head=True, **kw)
    qm = quantize_model(model, method, cfg, calib=calib)
    rec = qm.records["lm_head"]
    assert isinstance(rec, FPRecord if mode != "affine" else AffineRecord)
    assert torch.equal(rec.dequantize(), get_weight(model.lm_head).detach())
    x = _head_inputs(model, calib)
    h = 2 / x.shape[0] * x.T @ x
    _, hcfg, fn = head_quantizer(cfg)             # the data-free record the head gets without the option
    assert isinstance(hcfg, RTNConfig) and hcfg.mse_clip and hcfg.mode == mode
    rtn = fn(w, hcfg)

    def err(r) -> float:
        d = r.dequantize().double() - w.double()
        return float(((d @ h) * d).sum())

    ours, base = err(rec), err(rtn)
    st = qm.method["stats"]["head"]["lm_head"]
    assert ours == pytest.approx(st["out_err"], rel=1e-6)
    assert base == pytest.approx(st["out_err_data_free"], rel=1e-6)
    assert ours < 0.8 * base, (ours, base)   # measured 0.63-0.66


def test_tied_head_is_the_embedding_record(calib):
    model = tiny_model("llama", tie_word_embeddings=True)
    plain = quantize_model(tiny_model("llama", tie_word_embeddings=True), "gptq",
                           make_config("gptq", mode="mxfp4", include_lm_head=True), calib=calib)
    qm = quantize_model(model, "gptq", make_config("gptq", mode="mxfp4", head_gptq=True, include_lm_head=True),
                        calib=calib)
    assert set(qm.records) == set(plain.records) and "model.embed_tokens" in qm.records and "lm_head" not in qm.records
    assert not torch.equal(qm.records["model.embed_tokens"].codes, plain.records["model.embed_tokens"].codes)
    assert model.lm_head.weight is model.model.embed_tokens.weight   # still tied, holding the record's values
    assert torch.equal(qm.records["model.embed_tokens"].dequantize(), model.lm_head.weight.detach())
    st = qm.method["stats"]["head"]["model.embed_tokens"]
    assert st["out_err"] < st["out_err_data_free"]


def test_head_gptq_refusals():
    with pytest.raises(MacqError, match="--head-gptq: the head is not quantized; pass --include-lm-head"):
        make_config("gptq", head_gptq=True)
    with pytest.raises(MacqError, match="--head-gptq: the head is not quantized; pass --include-lm-head"):
        quantize_model(tiny_model("llama"), "awq", make_config("awq", head_gptq=True, include_embeddings=True, group_size=32),
                       calib=torch.zeros(2, 8, dtype=torch.long))
    assert "--head-gptq calibrates the head" in make_config("awq-gptq", head_gptq=True,
                                                            include_lm_head=True).stream_refusal()
    assert make_config("gptq", include_lm_head=True).stream_refusal() == ""

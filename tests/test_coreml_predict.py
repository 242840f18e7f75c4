"""Perplexity / latency driver: checked on Linux through the MIL backend (graph check), and on macOS
through Core ML itself for every compute-unit setting (``@pytest.mark.darwin``, skipped elsewhere)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from converters import export_coreml
from converters.predict import CoreMLSession, predict_coreml
from converters.synthetic import affine_record
from macq.errors import MacqError
from macq.models import get_weight, quantizable_modules
from macq.qmodel import QuantizedModel
from macq.tiny import tiny_model

CTX = 16
TOKENS = np.random.default_rng(0).integers(0, 512, size=2 * CTX + 1)


def _torch_ppl(model, tokens: np.ndarray, ctx: int) -> float:
    nll = []
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, ctx):
            win = torch.from_numpy(tokens[s:s + ctx + 1]).long()[None]
            logits = model(win[:, :-1]).logits[0].float()
            nll.append(torch.nn.functional.cross_entropy(logits, win[0, 1:], reduction="none"))
    return float(torch.exp(torch.cat(nll).mean()))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model("llama", seed=2)
    recs = {n: affine_record(get_weight(m).detach().float(), 4, 32, "asym") for n, m in quantizable_modules(model).items()}
    qm = QuantizedModel.from_model(model, recs)
    res = export_coreml(qm, tmp_path_factory.mktemp("p") / "p.mlpackage", context=CTX, graph="hf")
    return qm, res, _torch_ppl(qm.to_torch(torch.float32), TOKENS, CTX)


def test_mil_backend_perplexity_matches_torch(exported):
    qm, res, ref = exported
    out = predict_coreml(res.path, TOKENS, backend="mil", prefill=5)
    assert out.n_tokens == len(TOKENS) - 1 and out.backend == "mil" and out.notes
    assert abs(out.perplexity - ref) / ref < 5e-3, (out.perplexity, ref)
    s = CoreMLSession(res.path, backend="mil")
    s.step(TOKENS[None, :CTX])
    with pytest.raises(MacqError, match="context"):
        s.step(TOKENS[None, :1])


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux-only behaviour")
def test_coreml_backend_refused_off_macos(exported):
    with pytest.raises(MacqError, match="macOS"):
        CoreMLSession(exported[1].path, backend="coreml")


@pytest.mark.darwin
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
@pytest.mark.parametrize("units", ["ALL", "CPU_AND_NE", "CPU_ONLY"])
def test_coreml_runtime_perplexity(exported, units):
    qm, res, ref = exported
    out = predict_coreml(res.path, TOKENS, compute_units=units, backend="coreml", prefill=5)
    assert out.backend == "coreml" and out.decode_ms_per_token > 0
    assert abs(out.perplexity - ref) / ref < 2e-2, (units, out.perplexity, ref)

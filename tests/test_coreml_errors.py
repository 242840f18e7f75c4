"""Bad input → MacqError naming the argument / layer, and never a half-written .mlpackage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converters import export_coreml
from converters.inspect import load_program, weight_chains
from converters.synthetic import affine_record, uniform_lut_record
from macq.errors import MacqError
from macq.models import get_weight
from macq.qmodel import QuantizedModel
from macq.record import LUTRecord
from macq.tiny import tiny_model

Q = "model.layers.0.self_attn.q_proj"


def _qm(builder) -> QuantizedModel:
    model = tiny_model("llama")
    return QuantizedModel.from_model(model, {Q: builder(get_weight(model.get_submodule(Q)).detach().float())})


def _leftovers(d):
    return sorted(p.name for p in d.iterdir())


def test_refuses_overwrite_and_bad_arguments(tmp_path):
    qm = _qm(lambda w: uniform_lut_record(w, 4))
    out = tmp_path / "m.mlpackage"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(MacqError, match="exists"):
        export_coreml(qm, out, context=16)
    assert (out / "keep").read_text() == "x"
    with pytest.raises(MacqError, match=r"\.mlpackage"):
        export_coreml(qm, tmp_path / "m.onnx", context=16)
    with pytest.raises(MacqError, match="context"):
        export_coreml(qm, tmp_path / "n.mlpackage", context=10**6)
    with pytest.raises(MacqError, match="compute_units"):
        export_coreml(qm, tmp_path / "n.mlpackage", context=16, compute_units="GPU")
    qm.act_quant = {Q: {"bits": 8}}
    with pytest.raises(MacqError, match="activation"):
        export_coreml(qm, tmp_path / "n.mlpackage", context=16)
    assert _leftovers(tmp_path) == ["m.mlpackage"]


def test_bias_form_not_integer_refused_then_fallback(tmp_path):
    qm = _qm(lambda w: affine_record(w, 4, 32, "bias"))   # MLX form: b = min, −b/s not an integer
    with pytest.raises(MacqError, match=rf"{Q}.*bias-form.*allow_fallback"):
        export_coreml(qm, tmp_path / "b.mlpackage", context=16)
    assert _leftovers(tmp_path) == []                       # no package, no temp dir

    res = export_coreml(qm, tmp_path / "b.mlpackage", context=16, allow_fallback=True)
    assert any(Q in n and "fp16 offset" in n for n in res.notes), res.notes
    (chain,) = weight_chains(load_program(res.path)[0])
    assert chain["kind"] == "blockwise_shift_scale" and chain["code_dtype"] == "uint4"
    want = qm.records[Q].dequantize().half().float().numpy()
    # the default (ANE) graph stores a 1x1-conv weight [out, in, 1, 1]
    got = np.asarray(chain["op"].materialized_val_inference()).astype(np.float32).reshape(want.shape)
    dev = np.abs(got - want).max()
    scale = qm.records[Q].scales.float().max().item()
    assert 0 < dev < 0.01 * scale  # inexact (that is why it is refused by default) but close
    assert _leftovers(tmp_path) == ["b.mlpackage"]

    res2 = export_coreml(qm, tmp_path / "b.mlpackage", context=16, allow_fallback=True, force=True)
    assert res2.path.exists()


def test_unrepresentable_record_names_layer(tmp_path):
    def five_bit(w):
        idx = torch.randint(0, 32, w.shape, dtype=torch.uint8)
        return LUTRecord(indices=idx, lut=torch.linspace(-1, 1, 32).view(1, 32), bits=5)

    with pytest.raises(MacqError, match=rf"{Q}.*5 bits"):
        export_coreml(_qm(five_bit), tmp_path / "f.mlpackage", context=16)
    assert _leftovers(tmp_path) == []

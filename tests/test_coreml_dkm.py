"""DKM palettization → LUT records (exact extraction) → the same record-exact Core ML weight layout."""

from __future__ import annotations

import numpy as np
import torch

from converters.weights import plan_layouts
from macq.quantizers.dkm_train import dkm_quantize
from macq.record import LUTRecord
from macq.tiny import tiny_model


def test_dkm_records_are_exact_lut_records():
    model = tiny_model("llama", num_hidden_layers=1)   # DKM is slow on CPU: one layer, one step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    qm = dkm_quantize(model, calib, bits=4, group_size=16, steps=1, lr=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # input model untouched
    assert len(qm.records) == 7 and qm.method["method"] == "dkm"
    for name, rec in qm.records.items():
        assert isinstance(rec, LUTRecord) and rec.bits == 4 and rec.n_lut_groups == rec.shape[0] // 16
        w = before[name + ".weight"]
        assert 0 < (rec.dequantize() - w).pow(2).mean() < w.pow(2).mean()         # palettized, close
    assert not any("_COREML_" in k for k in qm.float_tensors)
    layouts, notes = plan_layouts(qm.records)                                        # exportable as-is
    assert notes == [] and all(steps[0][0] == "lut" and len(steps) == 1 for steps in layouts.values())
    torch_model = qm.to_torch()
    ids = calib[:1].long()
    with torch.no_grad():
        assert np.isfinite(torch_model(ids).logits.numpy()).all()

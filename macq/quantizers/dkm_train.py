"""DKM palettization (coremltools.optimize.torch ``DKMPalettizer``): fine-tune the LUTs *and* the weights on
calibration text with differentiable k-means, then hand the result to the exporter as ordinary
:class:`~macq.record.LUTRecord` s — so it goes through the same record-exact Core ML path as every method.

Why extract instead of using coremltools' own conversion: the finalized module holds the de-palettized
weight plus a ``_COREML_/weight/lut`` buffer ``[groups, 1, 2^b, 1]``; every weight equals one entry of its
group's LUT, so the indices are recovered exactly (checked; any mismatch raises).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from macq.errors import MacqError
from macq.record import LUTRecord

_LUT_KEY = "_COREML_/weight/lut"


def _config(names: list[str], bits: int, group_size: int):
    from coremltools.optimize.torch.palettization import DKMPalettizerConfig, ModuleDKMPalettizerConfig

    mod_cfg = ModuleDKMPalettizerConfig(n_bits=bits, weight_threshold=1, granularity="per_grouped_channel",
                                        group_size=group_size)
    return DKMPalettizerConfig(global_config=None, module_name_configs={n: mod_cfg for n in names})


def lut_record_from_module(mod: nn.Module, bits: int, name: str) -> LUTRecord:
    """Indices of a finalized DKM module: each weight's exact position in its row group's LUT."""
    lut = getattr(mod, _LUT_KEY, None)
    if lut is None:
        raise MacqError(f"{name}: no DKM LUT buffer ({_LUT_KEY}) after finalize")
    w = mod.weight.detach().float()
    out, inp = w.shape
    groups = lut.shape[0]
    if lut.dim() != 4 or lut.shape[1:] != (1, 2 ** bits, 1) or out % groups:
        raise MacqError(f"{name}: unexpected DKM LUT shape {tuple(lut.shape)}")
    lut2 = lut.detach().float().view(groups, 2 ** bits)
    wg = w.view(groups, -1)
    idx = (wg.unsqueeze(-1) - lut2.unsqueeze(1)).abs().argmin(-1)
    rec = LUTRecord(indices=idx.view(out, inp).to(torch.uint8), lut=lut2, bits=bits)
    if not torch.equal(rec.dequantize(torch.float32), w):
        raise MacqError(f"{name}: DKM weights are not all LUT entries (max |Δ| "
                        f"{float((rec.dequantize() - w).abs().max()):.3g})")
    return rec


def dkm_quantize(model: nn.Module, calib: torch.Tensor, bits: int = 4, group_size: int = 16, steps: int = 20,
                 lr: float = 1e-5, batch_size: int = 2, progress: bool = False):
    """DKM-palettize the decoder linears of a copy of ``model`` on ``calib [n, seq]`` token ids.

    Returns a :class:`~macq.qmodel.QuantizedModel` (LUT records, 16-row grouped LUTs by default).
    ``steps`` optimizer steps of the causal-LM loss, cycling over ``calib`` in batches.
    """
    from coremltools.optimize.torch.palettization import DKMPalettizer

    from macq.models import quantizable_modules
    from macq.progress import track
    from macq.qmodel import QuantizedModel

    if calib.dim() != 2 or calib.shape[0] < 1:
        raise MacqError("dkm: calibration ids must be [n_samples, seq_len]")
    names = list(quantizable_modules(model))
    work = copy.deepcopy(model).float().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pal = DKMPalettizer(work, _config(names, bits, group_size))
        prepared = pal.prepare(inplace=True)
        opt = torch.optim.Adam([p for p in prepared.parameters() if p.requires_grad], lr=lr)
        losses = []
        for step in track(range(steps), "dkm", enabled=progress):
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % calib.shape[0]
            ids = calib[rows].long()
            loss = prepared(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            pal.step()
            losses.append(float(loss))
        final = pal.finalize(prepared, inplace=True).eval()
    records = {n: lut_record_from_module(final.get_submodule(n), bits, n) for n in names}
    for mod in final.modules():  # LUTs now live in the records; coremltools' metadata buffers must go
        for key in [k for k in mod._buffers if k.startswith("_COREML_")]:
            mod._buffers.pop(key)
    method = {"method": "dkm", "bits": bits, "group_size": group_size, "steps": steps, "lr": lr,
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    return QuantizedModel.from_model(final, records, method=method)

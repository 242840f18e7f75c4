"""Side-by-side method comparison on one model and one text, used by the scripts in ``scripts/``.

One reference pass (log-probs of the unquantized model) is computed once and every method is scored
against it: perplexity on the held-out eval split, KL / top-1 vs the reference, bits per weight
(metadata charged), deployed size, wall time of quantization.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from macq.evaluate import md_table


@dataclass
class Row:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)


def fp16_copy(model):
    """The model with weights rounded to fp16 (compute stays fp32 on CPU): the honest 'fp16' baseline."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
    return m


def compare(model, tokenizer, rows: list[Row], dataset: str = "wiki", max_tokens: int = 4096, context: int = 512,
            calib_dataset: str = "c4", n_calib: int = 128, seq_len: int = 512, seed: int = 0,
            progress: bool = True, include_fp16: bool = True) -> list[dict[str, Any]]:
    from macq.data import eval_tokens
    from macq.eval import agreement_from_reference, perplexity, reference_logprobs
    from macq.pipeline import quantize

    ids = eval_tokens(tokenizer, dataset, max_tokens)
    ref = fp16_copy(model)
    ref_lp = reference_logprobs(ref, ids, context=context)
    fp_params = sum(p.numel() for p in model.parameters())
    out: list[dict[str, Any]] = []
    if include_fp16:
        ppl = perplexity(ref, ids, context=context)
        out.append({"method": "fp16", "bpw": 16.0, "ppl": ppl.ppl, "ppl_stderr": ppl.stderr, "kl": 0.0,
                    "top1": 1.0, "size_mib": fp_params * 2 / 2**20, "seconds": 0.0})
    from macq.eval.memory import measure_peak_detail

    for row in rows:
        t0 = time.perf_counter()
        qm, peak = measure_peak_detail(lambda: quantize(model, tokenizer, row.method, dict(row.options), calib_dataset,
                                                        n_calib, seq_len, seed, progress=progress, copy_model=True))
        secs = time.perf_counter() - t0
        qmodel = qm.to_torch()
        ppl = perplexity(qmodel, ids, context=context)
        ag = agreement_from_reference(ref_lp, qmodel, ids, context=context)
        out.append({"method": row.label, "bpw": qm.bits_per_weight(), "ppl": ppl.ppl, "ppl_stderr": ppl.stderr,
                    "kl": ag.kl, "top1": ag.top1, "size_mib": qm.nbytes() / 2**20, "seconds": secs,
                    "peak_mib": peak.peak_bytes / 2**20})
        del qmodel, qm
    return out


def table(rows: list[dict[str, Any]], with_time: bool = True) -> str:
    cols = ["method", "bpw", "ppl", "ppl_stderr", "kl", "top1", "size_mib"] + (["seconds", "peak_mib"] if with_time else [])
    return md_table(rows, [c for c in cols if any(c in r for r in rows)])

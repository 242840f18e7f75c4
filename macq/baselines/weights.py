"""Layer-by-layer weight comparison of a reference library's quantization with macq's record of the
same configuration: each against the float weight (MSE, SQNR, gap to the Gaussian rate–distortion bound
at its own effective rate, :func:`macq.eval.weight_distortion`) and against each other (largest absolute
difference; ``equal`` when every element matches exactly)."""

from __future__ import annotations

from typing import Any

import torch

from macq.eval import weight_distortion
from macq.record import bits_per_weight


def compare_layer(name: str, w_fp: torch.Tensor, w_ref: torch.Tensor, ref_bits: int, record=None) -> dict[str, Any]:
    w_fp, w_ref = w_fp.detach().float().cpu(), w_ref.detach().float().cpu()
    n = w_fp.numel()
    ref_bpw = ref_bits / n
    ref = weight_distortion(w_fp, w_ref, ref_bpw)
    row: dict[str, Any] = {"layer": name, "n": n, "ref_bpw": ref_bpw, "ref_mse": ref["mse"],
                           "ref_sqnr_db": ref["sqnr_db"], "ref_gap_bits": ref["gap_bits"]}
    if record is not None:
        w_macq = record.dequantize(torch.float32)
        mq = weight_distortion(w_fp, w_macq, bits_per_weight(record))
        diff = float((w_macq - w_ref).abs().max())
        row.update({"macq_bpw": bits_per_weight(record), "macq_mse": mq["mse"], "macq_sqnr_db": mq["sqnr_db"],
                    "macq_gap_bits": mq["gap_bits"], "max_abs_diff": diff, "equal": diff == 0.0})
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Weight-count-weighted means over layers (gaps are rates, so they average by count), pooled counts."""
    n = sum(r["n"] for r in rows)
    out: dict[str, Any] = {"layers": len(rows), "n": n}
    for k in ("ref_bpw", "ref_mse", "ref_gap_bits", "macq_bpw", "macq_mse", "macq_gap_bits"):
        if rows and all(k in r for r in rows):
            out[k] = sum(r[k] * r["n"] for r in rows) / n
    if rows and all("equal" in r for r in rows):
        out["layers_equal"] = sum(bool(r["equal"]) for r in rows)
        out["max_abs_diff"] = max(r["max_abs_diff"] for r in rows)
    return out

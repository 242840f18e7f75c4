"""Weight-space distortion of a quantizer, and how far it sits from the rate-distortion bound.

For a memoryless Gaussian source of variance sigma^2, no code at R bits per sample can beat
``D(R) = sigma^2 * 2^(-2R)`` (Shannon). Turning the measured MSE into ``gap_bits = 1/2 log2(mse / D(R))``
says how many bits per weight a quantizer spends beyond the bound at the distortion it reached; it is a
rate, so gaps of layers average by weight count. ``R`` is the *effective* rate, every scale, zero and
LUT entry charged (:func:`macq.record.bits_per_weight`), so metadata overhead shows up as gap.
Reference point: a fine uniform scalar quantizer on a Gaussian sits ``1/2 log2(pi e / 6) ~ 0.254`` bits
above the bound at high rate.

Caveat: the Gaussian is the *hardest* source of a given variance, so for other sources the true bound
is lower than ``D(R)``. Real weight matrices are not one stationary Gaussian (per-group scales adapt to
local variance, outliers are heavy-tailed), so a per-layer gap can be negative; it is a yardstick for
comparing methods at equal rate, not a theorem about them.

Statistics are accumulated in float64 over row chunks (an embedding of 28M weights in float64 would
otherwise need 230 MB per temporary).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from macq.models import get_weight
from macq.record import bits_per_weight

_CHUNK_ELEMS = 1 << 22


def _sums(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[int, float, float, float]:
    """``(n, sum w, sum w^2, sum (w - w_hat)^2)`` in float64, chunked along the first dim."""
    if w.shape != w_hat.shape:
        raise ValueError(f"weight_distortion: shapes differ {tuple(w.shape)} vs {tuple(w_hat.shape)}")
    w2 = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    h2 = w_hat.reshape(w2.shape)
    rows = max(1, _CHUNK_ELEMS // max(1, w2.shape[1]))
    s1 = s2 = se = 0.0
    for i in range(0, w2.shape[0], rows):
        a = w2[i: i + rows].detach().to(torch.float64)
        d = a - h2[i: i + rows].detach().to(device=a.device, dtype=torch.float64)
        s1 += float(a.sum())
        s2 += float((a * a).sum())
        se += float((d * d).sum())
    return w.numel(), s1, s2, se


def _from_sums(n: int, s1: float, s2: float, se: float, bpw: float) -> dict[str, float]:
    mse = se / n
    power = s2 / n
    var = max(power - (s1 / n) ** 2, 0.0)
    bound = var * 2.0 ** (-2.0 * bpw)
    sqnr = 10 * math.log10(power / mse) if mse > 0 and power > 0 else math.inf
    if mse > 0 and bound > 0:
        gap = 0.5 * math.log2(mse / bound)
    else:
        gap = -math.inf if mse == 0 else math.inf
    return {"mse": mse, "sqnr_db": sqnr, "rd_bound_mse": bound, "gap_bits": gap, "variance": var}


def weight_distortion(w: torch.Tensor, w_hat: torch.Tensor, bpw: float) -> dict[str, float]:
    """MSE, SQNR (dB, signal power ``E[w^2]`` over MSE), the Gaussian bound ``D(bpw)`` and the gap in bits.

    ``bpw`` is the effective rate (metadata charged). ``variance`` (of ``w``) is returned as well.
    """
    return _from_sums(*_sums(w, w_hat), bpw)


def distortion_table(qm, fp_model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized layer of ``qm`` against the float weights of ``fp_model`` (``[out, in]``
    orientation, Conv1D handled), then a last row ``name="(all)"``: weight-count-weighted MSE and gap,
    pooled SQNR, and the model's bits per weight."""
    rows: list[dict[str, Any]] = []
    tot_n, tot_s2, tot_se, gap_sum = 0, 0.0, 0.0, 0.0
    for name, rec in qm.records.items():
        w = get_weight(fp_model.get_submodule(name)).detach()
        w_hat = rec.dequantize(torch.float32)
        bpw = bits_per_weight(rec)
        n, s1, s2, se = _sums(w, w_hat)
        stats = _from_sums(n, s1, s2, se, bpw)
        rows.append({"name": name, "shape": tuple(rec.shape), "n": n, "bpw": bpw, "mse": stats["mse"],
                     "sqnr_db": stats["sqnr_db"], "rd_bound_mse": stats["rd_bound_mse"],
                     "gap_bits": stats["gap_bits"]})
        tot_n, tot_s2, tot_se = tot_n + n, tot_s2 + s2, tot_se + se
        gap_sum += n * stats["gap_bits"]
    if tot_n:
        mse = tot_se / tot_n
        rows.append({"name": "(all)", "shape": None, "n": tot_n, "bpw": qm.bits_per_weight(), "mse": mse,
                     "sqnr_db": 10 * math.log10(tot_s2 / tot_se) if tot_se > 0 else math.inf,
                     "rd_bound_mse": sum(r["rd_bound_mse"] * r["n"] for r in rows) / tot_n,
                     "gap_bits": gap_sum / tot_n})
    return rows

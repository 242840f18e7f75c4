"""SqueezeLLM's dense-and-sparse decomposition for LUT records: a fraction of each tensor kept exactly in fp16.

A LUT of ``2**bits`` entries fitted by k-means spends entries on the tails of each group; a few far-out weights
pull centroids away from the bulk. SqueezeLLM keeps those weights aside in a sparse fp16 matrix and fits the LUT
to the rest. Here:

* :func:`select_outliers` picks ``round(frac · numel)`` weights per tensor by their distance from their LUT group's
  mean, also for the sensitivity-weighted methods (``kmeans --weighted``, ``kmeans-cal``), whose sensitivities
  weight the fit of the rest. Measured: selecting by ``sensitivity · (w − mean)²`` instead was much worse on the
  default model's tied embedding/head (float decoder, Fisher-weighted 4-bit g16 head, 0.5%: wiki / c4 / tinystories
  perplexity 21.64 / 118.6 / 11.19 against 18.86 / 61.5 / 10.32 by distance, 21.45 / 84.4 / 11.61 without
  outliers; ``scripts/benchmarks/lut_embedding_probe.py``): a noisy Fisher diagonal from few tokens picks weights that are
  not outliers of the LUT at all.
* The k-means fit gives them weight 0 (:func:`fit_weights`); kmeans-cal's error feedback holds them fixed.
* :func:`attach_outliers` writes them into the :class:`~macq.record.LUTRecord` (their values *overwrite* the dense
  LUT value) and chooses the dense index at their positions so that Core ML's form of the record,
  ``lut_dense + sparse_to_dense(mask, r)`` in fp16, reproduces each value bit-exactly where any entry allows it.

What it costs in a Core ML file (iOS18 ``constexpr_sparse_to_dense``): a 1-bit mask over every weight plus 16 bits
per outlier, so 0.5% outliers add 1.08 bits/weight — :meth:`~macq.record.LUTRecord.storage_bits` charges it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from macq.record import LUTRecord


def n_outliers(numel: int, frac: float) -> int:
    return int(round(frac * numel))


def select_outliers(w: torch.Tensor, groups: torch.Tensor, frac: float) -> torch.Tensor:
    """Boolean mask ``[out, in]`` of the ``round(frac · numel)`` weights farthest from their LUT group's mean.

    ``groups`` is ``w`` reshaped to its LUT groups ``[G, n]`` (same element order as ``w.reshape(-1)``). Score:
    ``|w - mean_g|``. One threshold over the whole tensor, as SqueezeLLM's per-layer percentage: groups with heavier
    tails give up more weights.
    """
    k = n_outliers(w.numel(), frac)
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if k == 0:
        return mask.view_as(w)
    g = groups.float()
    dev = (g - g.mean(1, keepdim=True)).reshape(-1)
    mask[dev.abs().topk(k).indices] = True
    return mask.view_as(w)


def fit_weights(mask: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """k-means weights ``[out, in]``: the importance (or ones) with the outliers at 0, so they do not pull the LUT."""
    base = torch.ones(mask.shape, device=mask.device) if importance is None else importance.float().clone()
    return base.masked_fill(mask, 0.0)


def attach_outliers(rec: LUTRecord, pos: torch.Tensor, values: torch.Tensor) -> LUTRecord:
    """``rec`` with fp16 ``values`` at flat positions ``pos`` (any previous outliers replaced).

    The dense index at each outlier position is otherwise unused; it is set to the LUT entry nearest the value among
    those ``l`` for which ``fp16(l + fp16(v - l)) == v`` (Core ML adds the dense and sparse parts in fp16; Sterbenz:
    any entry within a factor 2 of ``v`` qualifies), or the nearest entry when none does (then
    :meth:`~macq.record.LUTRecord.outlier_residuals` reports the position as inexact and the exporter refuses it).
    """
    pos = pos.long().reshape(-1)
    if pos.numel() == 0:
        return replace(rec, outlier_pos=None, outlier_values=None)
    order = pos.argsort()
    pos, v16 = pos[order], values.reshape(-1)[order].half()
    out, inp = rec.shape
    rows, cols = pos // inp, pos % inp
    cand = rec.lut.float()[rows // (out // rec.n_lut_groups)]                      # [n, K]
    s = rec.block_scales()
    if s is not None:
        cand = cand * s[rows, cols // rec.block_size].unsqueeze(1)
    c16 = cand.half()
    r = (v16.float().unsqueeze(1) - c16.float()).half()
    exact = (c16.float() + r.float()).half() == v16.unsqueeze(1)
    dist = (v16.float().unsqueeze(1) - c16.float()).abs()
    best = torch.where(exact, dist, dist + float("inf")).argmin(1)
    best = torch.where(exact.any(1), best, dist.argmin(1))
    idx = rec.indices.clone()
    idx.view(-1)[pos] = best.to(idx.dtype)
    return replace(rec, indices=idx, outlier_pos=pos, outlier_values=v16)


def outliers_from_mask(rec: LUTRecord, w: torch.Tensor, mask: torch.Tensor) -> LUTRecord:
    """:func:`attach_outliers` with the weights of ``w [out, in]`` under ``mask`` (rounded to fp16)."""
    pos = mask.reshape(-1).nonzero().squeeze(1)
    return attach_outliers(rec, pos, w.reshape(-1)[pos])


def outlier_mask(rec: LUTRecord) -> torch.Tensor:
    """The record's outlier positions as a boolean ``[out, in]`` mask (all False without outliers)."""
    mask = torch.zeros(rec.indices.numel(), dtype=torch.bool, device=rec.indices.device)
    if rec.outlier_pos is not None:
        mask[rec.outlier_pos.long()] = True
    return mask.view(rec.shape)


__all__ = ["select_outliers", "fit_weights", "attach_outliers", "outliers_from_mask", "outlier_mask", "n_outliers"]

"""Sliding-window perplexity, as in Hugging Face's "Perplexity of fixed-length models" guide.

A window covers input positions ``[begin, end)`` with ``end - begin <= context``. Token ``t`` is
scored from the logits at ``t - 1``, so a window can score positions ``begin+1 .. end-1``; it scores
only those not scored by an earlier window (``t >= prev_end``). With ``stride == context`` windows do
not overlap and the first token of every window is *not* scored (it has no context inside its window:
exactly what the HF guide's code does, so numbers compare with published ones). With
``stride < context`` each window re-reads ``context - stride`` tokens as context and scores the next
``stride``. Token 0 is never scored. :func:`windows` is the single source of truth for which tokens
count, shared with :mod:`macq.eval.agreement`.

``model`` is either an HF causal LM (called with ``input_ids`` and ``use_cache=False``) or any callable
mapping a ``LongTensor [B, T]`` to logits ``[B, T, V]`` (torch or numpy), so other runtimes (MLX, a
Core ML emulator) reuse the same windows and :func:`nll_from_logits`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from macq.arch import context_limit
from macq.device import resolve_device
from macq.errors import MacqError
from macq.progress import track

LogitsFn = Callable[[torch.Tensor], object]
ModelLike = Union[nn.Module, LogitsFn]


@dataclass(frozen=True)
class Window:
    """Input positions ``[begin, end)``; targets ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def n_scored(self) -> int:
        return self.end - self.score_from

    @property
    def offset(self) -> int:
        """Index inside the window of the first *logit* used (the one predicting ``score_from``)."""
        return self.score_from - 1 - self.begin


def windows(n_tokens: int, context: int = 512, stride: int | None = None) -> list[Window]:
    """The windows over ``n_tokens`` tokens; every position ``1 .. n_tokens-1`` is scored at most once."""
    stride = context if stride is None else stride
    if context < 2:
        raise MacqError(f"context={context}: need at least 2 tokens per window")
    if not 1 <= stride <= context:
        raise MacqError(f"stride={stride}: expected 1 <= stride <= context ({context})")
    if n_tokens < 2:
        raise MacqError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        score_from = max(prev_end, begin + 1)
        if end > score_from:
            out.append(Window(begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return out


def nll_from_logits(logits: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-token negative log-likelihood (nats, float32) of ``targets [...]`` under ``logits [..., V]``.

    ``logits[i]`` must already be the prediction for ``targets[i]`` (shift done by the caller). The
    log-softmax runs in float32 whatever the model's dtype: fp16 logits lose the tail mass otherwise.
    """
    logits = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    targets = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
    v = logits.shape[-1]
    nll = F.cross_entropy(logits.float().reshape(-1, v), targets.reshape(-1).long().to(logits.device),
                          reduction="none")
    return nll.view(targets.shape)


def check_context(model: ModelLike, ws: list[Window]) -> None:
    """Refuse windows longer than an HF model's position table (GPT-2 would fail with an index error,
    RoPE models would silently extrapolate and report a meaningless perplexity)."""
    cfg = getattr(model, "config", None)
    max_pos = context_limit(cfg) if cfg is not None else None
    longest = max(w.length for w in ws)
    if isinstance(max_pos, int) and longest > max_pos:
        raise MacqError(f"context={longest} exceeds the model's {max_pos} positions; pass a smaller context")


def model_device_or(model: ModelLike, device: str | torch.device | None) -> torch.device:
    """Where inputs go: ``device`` if given (an ``nn.Module`` is moved there), else the model's own device."""
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        current = p.device if p is not None else torch.device("cpu")
        if device is None:
            return current
        dev = resolve_device(device)
        if current != dev:
            model.to(dev)
        return dev
    return torch.device("cpu") if device is None else resolve_device(device)


def forward_logits(model: ModelLike, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` for ``input_ids [B, T]`` from an HF model or a logits callable."""
    if isinstance(model, nn.Module):
        out = model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]
    out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise MacqError(f"ids must be a 1-D token tensor, got shape {tuple(ids.shape)}")
    return ids.long()


def window_batches(ws: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows in groups of ``batch_size`` that share a length (only the last can differ)."""
    if batch_size < 1:
        raise MacqError(f"batch_size={batch_size}: expected >= 1")
    batch: list[Window] = []
    for w in ws:
        if batch and (len(batch) == batch_size or w.length != batch[0].length):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def scored_logits(model: ModelLike, ids: torch.Tensor, batch: list[Window],
                  device: torch.device) -> Iterator[tuple[Window, torch.Tensor, torch.Tensor]]:
    """Run one batch of equal-length windows; yield ``(window, logits [n_scored, V], targets [n_scored])``."""
    x = torch.stack([ids[w.begin: w.end] for w in batch]).to(device)
    logits = forward_logits(model, x)
    for i, w in enumerate(batch):
        yield w, logits[i, w.offset: w.offset + w.n_scored], ids[w.score_from: w.end]


@dataclass
class PerplexityResult:
    """``ppl = exp(nll)``; ``stderr`` is the delta-method standard error ``ppl * SE(mean token NLL)``
    (treats token NLLs as independent, so it understates the true uncertainty somewhat)."""

    ppl: float
    nll: float
    stderr: float
    n_tokens: int
    n_windows: int
    context: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(model: ModelLike, ids: torch.Tensor, context: int = 512, stride: int | None = None,
               batch_size: int = 1, device: str | torch.device | None = None,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of ``ids`` (1-D LongTensor) under ``model`` with sliding windows (see module doc).

    ``device=None`` runs where the model already is; a given device moves an ``nn.Module`` there."""
    ids = _check_ids(ids)
    stride = context if stride is None else stride
    ws = windows(ids.numel(), context, stride)
    check_context(model, ws)
    dev = model_device_or(model, device)
    nll_parts: list[torch.Tensor] = []
    batches = list(window_batches(ws, batch_size))
    with torch.inference_mode():
        for batch in track(batches, "perplexity", enabled=progress):
            for _, logits, targets in scored_logits(model, ids, batch, dev):
                nll_parts.append(nll_from_logits(logits, targets).double().cpu())
    nll = torch.cat(nll_parts)
    n = nll.numel()
    mean = float(nll.mean())
    se = float(nll.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return PerplexityResult(ppl=ppl, nll=mean, stderr=ppl * se, n_tokens=n, n_windows=len(ws),
                            context=context, stride=stride)

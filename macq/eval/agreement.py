"""How closely a quantized model's next-token distribution follows the unquantized model's.

Scored on exactly the windows and positions :func:`macq.eval.perplexity.perplexity` scores, so the
numbers sit next to perplexity in one table. Per scored token:

* ``kl``: KL(p_ref || p_q) in nats, the expected extra code length when the quantized model stands in
  for the reference; mean over tokens (``kl_p99``: its 99th percentile, the bad tail that a mean hides).
* ``top1``: whether the two argmaxes agree (what greedy decoding sees).
* ``logits_mse``: mean squared difference of the *centred* logits (logits minus their mean over the
  vocab). Logits are only defined up to a per-token constant, so raw-logit MSE would charge a harmless
  shift; centred logits equal centred log-probs, which also makes the number computable from stored
  reference log-probs.

Many methods are compared against one reference: :func:`reference_logprobs` runs the reference once
and keeps its log-probs (fp32, exact). Memory is ``n_scored_tokens * vocab * 4`` bytes: 4096 tokens x
49152 vocab is about 0.8 GB, so keep the token budget modest or use :func:`agreement` (streams both
models window by window, nothing kept).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from macq.errors import MacqError
from macq.eval.perplexity import (
    ModelLike,
    _check_ids,
    check_context,
    model_device_or,
    scored_logits,
    window_batches,
    windows,
)
from macq.progress import track


class ReferenceLogprobs(list):
    """A list of fp32 log-prob tensors ``[n_scored, V]``, one per window, remembering its windows."""

    def __init__(self, items, context: int, stride: int, n_tokens: int):
        super().__init__(items)
        self.context, self.stride, self.n_tokens = context, stride, n_tokens

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


@dataclass
class AgreementResult:
    kl: float            # mean KL(p_ref || p_q) per scored token, nats
    kl_p99: float        # 99th percentile of the per-token KL
    top1: float          # fraction of scored tokens whose argmax agrees
    logits_mse: float    # mean squared difference of centred logits
    n_tokens: int
    n_windows: int
    context: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def token_stats(ref_lp: torch.Tensor, q_lp: torch.Tensor, chunk: int = 128
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(kl, top1_agree, centred_mse)`` from two fp32 log-prob tensors ``[n, V]``.

    Rows go ``chunk`` at a time so the temporaries stay at ``chunk x V`` (a few x 25 MB at V = 49152)
    instead of several copies of a whole 512-token window."""
    if ref_lp.shape != q_lp.shape:
        raise MacqError(f"agreement: reference log-probs {tuple(ref_lp.shape)} vs model {tuple(q_lp.shape)} "
                        "(different vocab or windows?)")
    q_lp = q_lp.to(ref_lp.device)
    kl, top1, mse = [], [], []
    for i in range(0, ref_lp.shape[0], chunk):
        r, q = ref_lp[i: i + chunk], q_lp[i: i + chunk]
        p = r.exp()
        # Where p_ref underflows to 0 the term is 0 (not 0 * -inf = nan).
        kl.append(torch.where(p > 0, p * (r - q), torch.zeros_like(p)).sum(-1).clamp_min(0.0))
        top1.append(r.argmax(-1) == q.argmax(-1))
        d = r - q
        mse.append((d - d.mean(-1, keepdim=True)).pow(2).mean(-1))
    return torch.cat(kl), torch.cat(top1), torch.cat(mse)


def _summarise(kl: list[torch.Tensor], top1: list[torch.Tensor], mse: list[torch.Tensor], n_windows: int,
               context: int, stride: int) -> AgreementResult:
    kl_all = torch.cat(kl).double()
    mse_all = torch.cat(mse).double()
    agree = torch.cat(top1)
    return AgreementResult(kl=float(kl_all.mean()), kl_p99=float(torch.quantile(kl_all, 0.99)),
                           top1=float(agree.double().mean()), logits_mse=float(mse_all.mean()),
                           n_tokens=kl_all.numel(), n_windows=n_windows, context=context, stride=stride)


def reference_logprobs(ref_model: ModelLike, ids: torch.Tensor, context: int = 512, stride: int | None = None,
                       device: str | torch.device | None = None, progress: bool = False) -> ReferenceLogprobs:
    """The reference's fp32 log-probs at every scored position, one ``[n_scored, V]`` CPU tensor per window."""
    ids = _check_ids(ids)
    stride = context if stride is None else stride
    ws = windows(ids.numel(), context, stride)
    check_context(ref_model, ws)
    dev = model_device_or(ref_model, device)
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for batch in track(list(window_batches(ws, 1)), "reference log-probs", enabled=progress):
            for _, logits, _ in scored_logits(ref_model, ids, batch, dev):
                out.append(_logprobs(logits).cpu())
    return ReferenceLogprobs(out, context=context, stride=stride, n_tokens=ids.numel())


def agreement_from_reference(ref: ReferenceLogprobs | list[torch.Tensor], model: ModelLike, ids: torch.Tensor,
                             context: int | None = None, stride: int | None = None,
                             device: str | torch.device | None = None, progress: bool = False) -> AgreementResult:
    """Agreement of ``model`` with stored reference log-probs (from :func:`reference_logprobs` on the same
    ``ids``, ``context`` and ``stride``; taken from ``ref`` when it remembers them)."""
    ids = _check_ids(ids)
    context = context if context is not None else getattr(ref, "context", 512)
    stride = stride if stride is not None else getattr(ref, "stride", context)
    if isinstance(ref, ReferenceLogprobs) and (ref.context, ref.stride, ref.n_tokens) != (context, stride, ids.numel()):
        raise MacqError(f"agreement: reference was computed with context={ref.context}, stride={ref.stride} on "
                        f"{ref.n_tokens} tokens; asked for context={context}, stride={stride} on {ids.numel()}")
    ws = windows(ids.numel(), context, stride)
    if len(ref) != len(ws) or any(r.shape[0] != w.n_scored for r, w in zip(ref, ws)):
        raise MacqError("agreement: reference log-probs do not match these ids/context/stride windows")
    check_context(model, ws)
    dev = model_device_or(model, device)
    kl, top1, mse = [], [], []
    with torch.inference_mode():
        for i, batch in enumerate(track(list(window_batches(ws, 1)), "agreement", enabled=progress)):
            for _, logits, _ in scored_logits(model, ids, batch, dev):
                k, t, m = token_stats(ref[i].float(), _logprobs(logits).cpu())
                kl.append(k)
                top1.append(t)
                mse.append(m)
    return _summarise(kl, top1, mse, len(ws), context, stride)


def agreement(ref_model: ModelLike, model: ModelLike, ids: torch.Tensor, context: int = 512,
              stride: int | None = None, device: str | torch.device | None = None,
              progress: bool = False) -> AgreementResult:
    """Agreement of ``model`` with ``ref_model``, both run window by window (nothing stored)."""
    ids = _check_ids(ids)
    stride = context if stride is None else stride
    ws = windows(ids.numel(), context, stride)
    check_context(ref_model, ws)
    check_context(model, ws)
    dev = model_device_or(ref_model, device)
    model_device_or(model, dev)
    kl, top1, mse = [], [], []
    with torch.inference_mode():
        for batch in track(list(window_batches(ws, 1)), "agreement", enabled=progress):
            refs = list(scored_logits(ref_model, ids, batch, dev))
            qs = list(scored_logits(model, ids, batch, dev))
            for (_, r_logits, _), (_, q_logits, _) in zip(refs, qs):
                k, t, m = token_stats(_logprobs(r_logits), _logprobs(q_logits))
                kl.append(k.cpu())
                top1.append(t.cpu())
                mse.append(m.cpu())
    return _summarise(kl, top1, mse, len(ws), context, stride)

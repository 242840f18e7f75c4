"""Weight error vs output error: does a layer's weight MSE predict what the model outputs?

Two levels, both with the float model as the only context (every other layer stays float, so a number
belongs to one linear and one method):

* Layer output error on calibration activations. With ``H = XᵀX / N`` (the linear's input second
  moment over N calibration tokens) and ``Δ = Ŵ - W``, the output MSE per element is
  ``tr(Δ H Δᵀ) / out`` exactly, so the activations are collected once and every method is scored from H.
  ``amplification = (‖XΔᵀ‖² / ‖XWᵀ‖²) / (‖Δ‖² / ‖W‖²)``, output relative error over weight relative error
  (both squared): 1 when the error is spread like the weight, > 1 when it lands on directions the inputs use.
* End-to-end: write that one linear's dequantized weight into the float model and score the eval windows
  against the float model's stored log-probs: KL(p_ref || p_q), the centred-logits MSE, Δ cross-entropy.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from macq.arch import arch_spec
from macq.eval.agreement import ReferenceLogprobs, token_stats
from macq.eval.perplexity import nll_from_logits, scored_logits, window_batches, windows
from macq.models import get_weight, set_weight


def input_grams(model: nn.Module, names: list[str], calib: torch.Tensor, batch_size: int = 4
                ) -> dict[str, torch.Tensor]:
    """``{name: XᵀX / N}`` (float32, ``[in, in]``) of each linear's input over the calibration ids.

    Linears that read the same tensor (q/k/v, gate/up) share one Gram: a hook keys them by the input's
    storage, so memory is one matrix per distinct input, not per linear."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    # Keyed by storage; the tensor is held until the batch ends so its memory cannot be reused by a later,
    # different input of the same size (which would alias two unrelated linears).
    seen: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
    alias: dict[str, str] = {}

    def hook(name: str):
        def fn(_mod, args, _out):
            x = args[0].detach()
            key = (x.data_ptr(), x.numel())
            if key in seen and seen[key][0] != name:
                alias[name] = seen[key][0]
                return
            seen[key] = (name, x)
            x2 = x.reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + x2.T @ x2
            counts[name] = counts.get(name, 0) + x2.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for i in range(0, calib.shape[0], batch_size):
                seen.clear()
                model(input_ids=calib[i: i + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {n: sums[n] / counts[n] for n in sums}
    for n, a in alias.items():
        out.setdefault(n, out[a])
    return out


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> dict[str, float]:
    """Weight MSE / relative error and layer output MSE / relative error / amplification from ``H``."""
    w64, d64, h64 = w.double(), (w_hat.double() - w.double()), gram.double()
    w_mse = float((d64 * d64).mean())
    w_rel = float((d64 * d64).sum() / (w64 * w64).sum())
    out_se = float(((d64 @ h64) * d64).sum())
    sig = float(((w64 @ h64) * w64).sum())
    out_rel = out_se / sig if sig > 0 else math.nan
    return {"weight_mse": w_mse, "weight_rel": w_rel, "output_mse": out_se / w.shape[0], "output_rel": out_rel,
            "amplification": out_rel / w_rel if w_rel > 0 else math.nan}


class LayerInputs:
    """The float model's hidden state entering every decoder layer, per eval window (captured once).

    Quantizing a linear of layer ``l`` alone leaves layers ``< l`` exact, so its end-to-end effect can be
    computed from layer ``l``'s cached input: the model runs with its decoder-layer list cut to ``[l:]``
    and ``inputs_embeds`` = that input. Only for architectures whose embedding output *is* layer 0's
    input (no position-embedding table added, per the registry's ``extra_embeds``); others run in full."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, ref: ReferenceLogprobs):
        spec = arch_spec(model)
        self.enabled = not spec.extra_embeds
        self.parent_path, _, self.attr = spec.layers.rpartition(".")
        self.inputs: list[list[torch.Tensor]] = []
        if not self.enabled:
            return
        layers = model.get_submodule(spec.layers)
        current: list[torch.Tensor] = []

        def pre(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            current.append(h.detach().clone())

        hs = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
        dev = next(model.parameters()).device
        try:
            with torch.inference_mode():
                for w in windows(ids.numel(), ref.context, ref.stride):
                    current.clear()
                    model(input_ids=ids[w.begin: w.end].unsqueeze(0).to(dev), use_cache=False)
                    self.inputs.append(list(current))
        finally:
            for h in hs:
                h.remove()

    @contextmanager
    def cut(self, model: nn.Module, start: int) -> Iterator[None]:
        parent = model.get_submodule(self.parent_path) if self.parent_path else model
        full = getattr(parent, self.attr)
        setattr(parent, self.attr, nn.ModuleList(list(full)[start:]))
        try:
            yield
        finally:
            setattr(parent, self.attr, full)


def _window_logits(model: nn.Module, ids: torch.Tensor, ws, dev, start: int, cache: LayerInputs | None):
    """``(window, logits [n_scored, V], targets)`` per window, from layer ``start`` when ``cache`` allows."""
    if cache is None or not cache.enabled or start <= 0:
        for batch in window_batches(ws, 1):
            yield from scored_logits(model, ids, batch, dev)
        return
    with cache.cut(model, start):
        for i, w in enumerate(ws):
            out = model(inputs_embeds=cache.inputs[i][start].to(dev), use_cache=False)
            yield w, out.logits[0, w.offset: w.offset + w.n_scored], ids[w.score_from: w.end]


def score(model: nn.Module, ids: torch.Tensor, ref: ReferenceLogprobs, start: int = 0,
          cache: LayerInputs | None = None) -> dict[str, float]:
    """One pass over the reference's windows: mean NLL (nats), perplexity, and agreement with ``ref``.
    With ``cache`` and ``start > 0`` the float layers before ``start`` are not recomputed."""
    ws = windows(ids.numel(), ref.context, ref.stride)
    dev = next(model.parameters()).device
    nll, kl, top1, mse = [], [], [], []
    with torch.inference_mode():
        for i, (_, logits, targets) in enumerate(_window_logits(model, ids, ws, dev, start, cache)):
            lp = torch.log_softmax(logits.float(), -1).cpu()
            nll.append(nll_from_logits(lp, targets))
            k, t, m = token_stats(ref[i].float(), lp)
            kl.append(k)
            top1.append(t)
            mse.append(m)
    mean_nll = float(torch.cat(nll).double().mean())
    return {"nll": mean_nll, "ppl": math.exp(mean_nll), "kl": float(torch.cat(kl).double().mean()),
            "top1": float(torch.cat(top1).double().mean()), "logits_mse": float(torch.cat(mse).double().mean()),
            "n_tokens": int(sum(x.numel() for x in nll))}


@contextmanager
def swapped(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily write ``[out, in]`` weights into ``model``'s modules; restore the originals after."""
    saved = {n: get_weight(model.get_submodule(n)).detach().clone() for n in weights}
    try:
        with torch.no_grad():
            for n, w in weights.items():
                set_weight(model.get_submodule(n), w)
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                set_weight(model.get_submodule(n), w)


def alone_effect(model: nn.Module, weights: dict[str, torch.Tensor], ids: torch.Tensor, ref: ReferenceLogprobs,
                 base: dict[str, float], start: int = 0, cache: LayerInputs | None = None) -> dict[str, Any]:
    """Score ``model`` with only ``weights`` replaced: KL, logits MSE, top-1, Δ cross-entropy, Δ perplexity.
    ``start``: the first decoder layer any of ``weights`` belongs to (with ``cache``, earlier layers are skipped)."""
    with swapped(model, weights):
        s = score(model, ids, ref, start=start, cache=cache)
    return {"kl": s["kl"], "logits_mse": s["logits_mse"], "top1": s["top1"], "delta_ce": s["nll"] - base["nll"],
            "delta_ppl": s["ppl"] - base["ppl"], "ppl": s["ppl"]}

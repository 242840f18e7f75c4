"""The measurements every baseline row gets, through macq's one evaluator (macq.eval).

Perplexity and KL/top-1 come from one pass over the windows: the model's logits for a window are kept
until both scorers have read them (:class:`OnePass`), so a slow runtime (bnb's CPU kernels, MLX's CPU
build) runs each window once. Latency is :func:`macq.eval.latency` (warm-up, median of repeats, device
synchronised before every clock read). Peak memory is CUDA's allocator peak on CUDA, the process's peak
resident set elsewhere (:func:`macq.eval.memory.measure_peak_detail`).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from macq.eval import agreement_from_reference, perplexity
from macq.eval.memory import measure_peak_detail
from macq.eval.perplexity import forward_logits
from macq.results import Metric


class OnePass:
    """A logits callable that remembers the last input and its logits: perplexity and agreement walk
    the same windows in the same order, so the second call for a window is answered from memory."""

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], Any], device: torch.device | None = None):
        self.model, self.device = model, device
        self._key: bytes | None = None
        self._logits: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = np.asarray(x.cpu()).tobytes() + str(tuple(x.shape)).encode()
        if key != self._key:
            self.calls += 1
            with torch.inference_mode():
                x_dev = x.to(self.device) if self.device is not None else x
                self._logits = forward_logits(self.model, x_dev).float().cpu()
            self._key = key
        return self._logits


def quality(model: nn.Module | Callable, ids: torch.Tensor, ref_logprobs, context: int,
            device: torch.device | None = None, stride: int | None = None) -> dict[str, Metric]:
    """Perplexity (± delta-method stderr) and KL / top-1 against stored float log-probs, one pass."""
    fn = OnePass(model, device)
    ppl = perplexity(fn, ids, context=context, stride=stride)
    out = {"ppl": Metric(ppl.ppl, "perplexity", ppl.stderr), "n_tokens": Metric(ppl.n_tokens, "tokens")}
    if ref_logprobs is not None:
        ag = agreement_from_reference(ref_logprobs, fn, ids, context=context, stride=stride)
        out.update({"kl": Metric(ag.kl, "nats/token"), "kl_p99": Metric(ag.kl_p99, "nats/token"),
                    "top1": Metric(ag.top1, "fraction")})
    return out


def quality_with_peak(model: nn.Module | Callable, ids, ref_logprobs, context: int,
                      device: torch.device) -> dict[str, Metric]:
    """:func:`quality`, and the memory peak while it ran (the evaluation windows are the workload)."""
    metrics, peak = measure_peak_detail(lambda: quality(model, ids, ref_logprobs, context, device))
    if device.type == "cuda" and peak.cuda_peak_bytes is not None:
        metrics["peak_memory"] = Metric(peak.cuda_peak_bytes / 2**20, "MiB (CUDA max_memory_allocated)")
    else:
        metrics["peak_memory"] = Metric(peak.peak_bytes / 2**20, "MiB (process peak RSS)" + ("" if peak.exact else
                                                                                            ", upper bound"))
    return metrics


def latency_metrics(model: nn.Module, device: torch.device, prompt_len: int = 128, new_tokens: int = 32,
                    repeats: int = 3, warmup: int = 1, threads: int | None = None) -> dict[str, Metric]:
    """Prefill and decode time per token and tokens/s from :func:`macq.eval.latency`."""
    from macq.eval import latency

    lat = latency(model, prompt_len=prompt_len, new_tokens=new_tokens, device=device, repeats=repeats,
                  warmup=warmup, threads=threads)
    per = f"median of {lat.repeats} after {warmup} warm-up, prompt {prompt_len}, {new_tokens} new tokens"
    return {"prefill_ms_per_token": Metric(lat.prefill_ms / prompt_len, f"ms/token ({per})"),
            "decode_ms_per_token": Metric(lat.decode_ms_per_token, f"ms/token ({per})"),
            "prefill_tokens_per_s": Metric(lat.prefill_tokens_per_s, "tokens/s"),
            "decode_tokens_per_s": Metric(lat.tokens_per_s, "tokens/s"),
            "threads": Metric(lat.threads, "torch intra-op threads")}


def size_metrics(quantized_bits: int, n_quantized: int, other_bytes: int) -> dict[str, Metric]:
    """Bits per weight over the quantized layers (metadata charged) and the deployed size."""
    total = (quantized_bits + 7) // 8 + other_bytes
    return {"bits_per_weight": Metric(quantized_bits / n_quantized if n_quantized else None,
                                      "bits/weight (quantized layers, metadata charged)"),
            "size": Metric(total / 2**20, "MiB (quantized layers + other tensors at fp16, tied once)")}

"""Prefill and decode latency of an HF causal LM with its KV cache, the two numbers a chat user feels
(time to first token, then time per generated token).

Prefill is one forward over the prompt with ``use_cache=True``; decode is a manual greedy loop that
feeds one token plus ``past_key_values`` (no ``generate()``: its logits processors, stopping criteria
and host syncs would be timed too). The device is synchronized before every clock read
(``time.perf_counter``), since CUDA/MPS kernels return before they finish. The prompt is random token
ids from a seeded generator: latency does not depend on the text, and seeding keeps runs identical.
Medians over ``repeats`` (after ``warmup`` untimed runs) resist the noise of a shared machine.

``threads`` pins torch's intra-op CPU threads for the measurement (restored afterwards) and is recorded:
on a loaded machine, OpenMP threads that outnumber the free cores spin against each other and a tiny
model's forward can take 100x longer with 2 threads than with 1.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from macq.arch import context_limit
from macq.compat import cache_keyword, output_cache
from macq.device import resolve_device, synchronize
from macq.errors import MacqError


@dataclass
class LatencyResult:
    prefill_ms: float             # median time of the prompt forward pass
    decode_ms_per_token: float    # median over repeats of (decode loop time / new_tokens)
    tokens_per_s: float           # decode throughput: batch * 1000 / decode_ms_per_token
    prefill_tokens_per_s: float   # batch * prompt_len * 1000 / prefill_ms
    device: str
    dtype: str
    repeats: int
    prompt_len: int
    new_tokens: int
    batch: int
    threads: int                  # torch intra-op threads during the measurement
    prefill_ms_all: list[float]
    decode_ms_per_token_all: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _one_run(model: nn.Module, prompt: torch.Tensor, new_tokens: int, dev: torch.device) -> tuple[float, float]:
    """One prefill + greedy decode; returns (prefill seconds, decode seconds)."""
    synchronize(dev)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    synchronize(dev)
    t1 = time.perf_counter()
    past, kw = output_cache(out), cache_keyword(model)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{kw: past})
        past = output_cache(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(dev)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def latency(model: nn.Module, prompt_len: int = 128, new_tokens: int = 32, device: str | torch.device = "cpu",
            warmup: int = 2, repeats: int = 5, batch: int = 1, seed: int = 0,
            threads: int | None = None) -> LatencyResult:
    """Median prefill time and per-token decode time of ``model`` on ``device`` (the model is moved there)."""
    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or warmup < 0 or batch < 1:
        raise MacqError(f"latency: prompt_len={prompt_len}, new_tokens={new_tokens}, repeats={repeats}, "
                        f"warmup={warmup}, batch={batch}: expected positive sizes")
    cfg = model.config
    max_pos = context_limit(cfg) if cfg is not None else None
    if max_pos is not None and prompt_len + new_tokens > max_pos:
        raise MacqError(f"latency: prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's "
                        f"{max_pos} positions")
    dev = resolve_device(device)
    model.to(dev).eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).to(dev)
    prefill, decode = [], []
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                p, d = _one_run(model, prompt, new_tokens, dev)
                if i >= warmup:
                    prefill.append(p * 1e3)
                    decode.append(d * 1e3 / new_tokens)
    finally:
        torch.set_num_threads(saved_threads)
    pm, dm = statistics.median(prefill), statistics.median(decode)
    dtype = next(model.parameters()).dtype
    return LatencyResult(prefill_ms=pm, decode_ms_per_token=dm, tokens_per_s=batch * 1e3 / dm,
                         prefill_tokens_per_s=batch * prompt_len * 1e3 / pm, device=str(dev),
                         dtype=str(dtype).removeprefix("torch."), repeats=repeats, prompt_len=prompt_len,
                         new_tokens=new_tokens, batch=batch, threads=used_threads, prefill_ms_all=prefill, decode_ms_per_token_all=decode)

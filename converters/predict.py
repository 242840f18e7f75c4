"""Run an exported ``.mlpackage`` token by token: perplexity and per-token prefill / decode latency.

One session drives all three graph variants (stateful flexible, stateful fixed-shape, KV-in/KV-out)
from the package's own input names. Two backends with one interface:

* ``coreml`` (macOS only): ``MLModel.predict`` with ``compute_units`` ALL / CPU_AND_NE / CPU_ONLY /
  CPU_AND_GPU — the real runtime, the numbers to report.
* ``mil`` (anywhere): :mod:`converters.mil_runner` value inference — a graph check; its timings
  measure numpy, never the device, and are labelled so.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.wrapper import causal_mask
from macq.errors import MacqError


@dataclass
class PredictResult:
    backend: str
    compute_units: str
    n_tokens: int
    perplexity: float
    prefill_ms_per_token: float | None
    decode_ms_per_token: float | None
    notes: list[str] = field(default_factory=list)
    ppl_stderr: float | None = None   # delta method, as macq's torch evaluator: ppl * SE(mean token NLL)
    kl: float | None = None           # mean KL(p_ref || p) per scored token, nats (with a reference)
    top1: float | None = None         # argmax agreement with the reference


class CoreMLSession:
    """Holds the model, the KV state (or caches) and the number of tokens seen."""

    def __init__(self, path: str | Path, compute_units: str = "ALL", backend: str = "auto"):
        from converters.inspect import inspect_mlpackage, load_program

        self.path = Path(path)
        if backend == "auto":
            backend = "coreml" if sys.platform == "darwin" else "mil"
        if backend == "coreml" and sys.platform != "darwin":
            raise MacqError("Core ML prediction needs macOS; on Linux use backend='mil' (graph check only)")
        self.backend, self.compute_units = backend, compute_units
        self.loaded = load_program(self.path)
        info = inspect_mlpackage(self.path, self.loaded)
        self.inputs, self.stateful = set(info["inputs"]), bool(info["states"])
        self.fixed = "position" in self.inputs
        spec = self.loaded[1]
        mask = next(i for i in spec.description.input if i.name == "causal_mask").type.multiArrayType
        self.context = self._context(spec)
        self.mask_width = int(mask.shape[-1]) if self.fixed else None
        if backend == "coreml":
            import coremltools as ct

            self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.reset()

    @staticmethod
    def _context(spec) -> int:
        if spec.description.state:
            return int(spec.description.state[0].type.stateType.arrayType.shape[3])
        cache = next(i for i in spec.description.input if i.name == "key_cache_in")
        return int(cache.type.multiArrayType.shape[3])

    def reset(self) -> None:
        self.pos = 0
        self.state = self.model.make_state() if self.backend == "coreml" and self.stateful else None
        self.kv: tuple | None = None

    def _feed(self, ids: np.ndarray) -> dict:
        n = ids.shape[1]
        feed = {"input_ids": ids.astype(np.int32),
                "causal_mask": causal_mask(n, self.pos, self.mask_width)}
        if self.fixed:
            feed["position"] = np.array([self.pos], dtype=np.int32)
        if not self.stateful:
            if self.kv is None:
                shape = [int(d) for d in next(i for i in self.loaded[1].description.input
                                              if i.name == "key_cache_in").type.multiArrayType.shape]
                self.kv = (np.zeros(shape, np.float16), np.zeros(shape, np.float16))
            feed["key_cache_in"], feed["value_cache_in"] = self.kv
        return feed

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Feed ``ids [1, n]`` (n must be 1 for fixed-shape models); returns logits ``[n, vocab]`` float32."""
        if self.pos + ids.shape[1] > self.context:
            raise MacqError(f"context {self.context} exceeded ({self.pos} + {ids.shape[1]} tokens)")
        if self.fixed and ids.shape[1] != 1:
            raise MacqError("a fixed-shape model takes one token per call")
        feed = self._feed(ids)
        if self.backend == "coreml":
            out = self.model.predict(feed, state=self.state) if self.stateful else self.model.predict(feed)
        else:
            from converters.mil_runner import run_program

            out, self.state = run_program(self.loaded[0], feed, self.state)
        if not self.stateful:
            self.kv = (out["key_cache_out"], out["value_cache_out"])
        self.pos += ids.shape[1]
        return np.asarray(out["logits"], dtype=np.float32)[0]


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
    return lse - logits[np.arange(len(targets)), targets]


def predict_coreml(path: str | Path, token_ids: np.ndarray, compute_units: str = "ALL", backend: str = "auto",
                   prefill: int | None = None) -> PredictResult:
    """Perplexity of ``token_ids`` (1-D) in windows of the model's context, plus latency.

    Each window: the first ``prefill`` tokens (default: half the window; fixed-shape models: 1 token per
    call throughout) go in one call (prefill latency per token), the rest one per call (decode latency).
    """
    s = CoreMLSession(path, compute_units, backend)
    token_ids = np.asarray(token_ids).reshape(-1)
    if token_ids.size < 2:
        raise MacqError("perplexity needs at least 2 tokens")
    nll, pre_t, pre_n, dec_t, dec_n = [], 0.0, 0, 0.0, 0
    for start in range(0, token_ids.size - 1, s.context):
        win = token_ids[start:start + s.context + 1]
        s.reset()
        n_in = len(win) - 1
        p = 1 if s.fixed else max(1, min(n_in, prefill if prefill is not None else n_in // 2))
        t0 = time.perf_counter()
        logits = [s.step(win[None, :p])]
        pre_t += time.perf_counter() - t0
        pre_n += p
        for t in range(p, n_in):
            t0 = time.perf_counter()
            logits.append(s.step(win[None, t:t + 1]))
            dec_t += time.perf_counter() - t0
            dec_n += 1
        nll.append(_nll(np.concatenate(logits), win[1:]))
    notes = [] if s.backend == "coreml" else ["backend=mil: numpy value inference (graph check); latency is not device latency"]
    return PredictResult(backend=s.backend, compute_units=compute_units if s.backend == "coreml" else "n/a",
                         n_tokens=int(sum(len(x) for x in nll)), perplexity=float(np.exp(np.concatenate(nll).mean())),
                         prefill_ms_per_token=1e3 * pre_t / max(pre_n, 1),
                         decode_ms_per_token=1e3 * dec_t / max(dec_n, 1), notes=notes)

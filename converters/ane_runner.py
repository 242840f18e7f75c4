"""Run an ANE-graph export (one package, or chunks chained by their manifest) token by token.

Prompt tokens go through the ``prefill`` function in blocks of ``prefill_len`` (a short last block is padded:
pad tokens sit at the following positions, are never attended to by real tokens, and are overwritten by
the decode steps that reach those slots); every further token goes through ``decode``. Each layer chunk
holds one KV state that both functions read and write.

Two backends, one interface:

* ``coreml`` (macOS only): ``MLModel(path, function_name=..., compute_units=...)`` per chunk and function,
  one ``make_state()`` per layer chunk shared by its two functions: real Core ML prediction and latency.
* ``mil`` (anywhere): :func:`converters.mil_runner.run_program` on each chunk's program, the state emulated
  as arrays: a GRAPH CHECK; its timings measure numpy, not a device.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.chunks import read_manifest
from converters.wrapper import causal_mask
from macq.errors import MacqError


@dataclass
class Timing:
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0
    calls: list[tuple[str, float]] = field(default_factory=list)


class AneSession:
    def __init__(self, path: str | Path, compute_units: str = "ALL", backend: str = "auto"):
        from converters.convert import COMPUTE_UNITS

        self.manifest, root = read_manifest(path)
        if backend == "auto":
            backend = "coreml" if sys.platform == "darwin" else "mil"
        if backend not in ("coreml", "mil"):
            raise MacqError(f"backend={backend!r}: expected coreml or mil")
        if backend == "coreml" and sys.platform != "darwin":
            raise MacqError("Core ML prediction needs macOS; on Linux use backend='mil' (graph check only)")
        if compute_units not in COMPUTE_UNITS:
            raise MacqError(f"compute_units={compute_units!r}: expected one of {', '.join(COMPUTE_UNITS)}")
        self.backend, self.compute_units = backend, compute_units
        self.paths = [root / c.path for c in self.manifest.chunks]
        self.context, self.block = self.manifest.context, self.manifest.prefill_len
        if backend == "mil":
            from converters.inspect import load_program

            self.programs = [load_program(p)[0] for p in self.paths]
        else:  # pragma: no cover - macOS only
            import coremltools as ct

            cu = getattr(ct.ComputeUnit, compute_units)
            self.models = [{fn: ct.models.MLModel(str(p), compute_units=cu, function_name=fn)
                            for fn in self.manifest.functions} for p in self.paths]
        self.timing = Timing()
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        if self.backend == "mil":
            self.states: list = [None] * len(self.paths)
        else:  # pragma: no cover - macOS only
            self.states = [m["decode"].make_state() if c.stop > c.start else None
                           for m, c in zip(self.models, self.manifest.chunks)]

    def _call(self, i: int, fn: str, feed: dict) -> dict:
        if self.backend == "mil":
            from converters.mil_runner import run_program

            out, self.states[i] = run_program(self.programs[i], feed, self.states[i], function=fn)
            return out
        model = self.models[i][fn]  # pragma: no cover - macOS only
        return model.predict(feed, state=self.states[i]) if self.states[i] is not None else model.predict(feed)

    def _run(self, ids: np.ndarray, fn: str) -> np.ndarray:
        """One call of ``fn`` on ``ids [n]`` (n = the function's fixed length) at positions pos..pos+n-1."""
        n = ids.size
        pos = np.arange(self.pos, self.pos + n, dtype=np.int32)
        mask = causal_mask(n, self.pos, self.context)
        x: dict = {"input_ids": ids.reshape(1, n).astype(np.int32)}
        for i, c in enumerate(self.manifest.chunks):
            feed = dict(x)
            if c.stop > c.start:
                feed.update(position_ids=pos, causal_mask=mask)
            out = self._call(i, fn, feed)
            x = {"hidden": np.asarray(out["hidden_out"], dtype=np.float16)} if "hidden_out" in out else out
        parts = [np.asarray(x[f"logits_{j}"], dtype=np.float32)[0] for j in range(len(self.manifest.vocab_parts))]
        return np.concatenate(parts, axis=-1)                      # [n, vocab]

    def feed(self, ids: np.ndarray, prefill: bool = True) -> np.ndarray:
        """Feed ``ids`` (1-D); returns their logits ``[len(ids), vocab]``. ``prefill=False``: decode only."""
        ids = np.asarray(ids).reshape(-1)
        if self.pos + ids.size > self.context:
            raise MacqError(f"context {self.context} exceeded ({self.pos} + {ids.size} tokens)")
        out, t = [], 0
        while t < ids.size:
            rest = ids.size - t
            if prefill and rest > 1 and self.pos + self.block <= self.context:
                take = min(rest, self.block)
                blk = np.zeros(self.block, dtype=np.int32)
                blk[:take] = ids[t:t + take]
                t0 = time.perf_counter()
                logits = self._run(blk, "prefill")[:take]
                dt = time.perf_counter() - t0
                self.timing.prefill_s += dt
                self.timing.prefill_tokens += take
                self.timing.calls.append(("prefill", dt))
            else:
                take = 1
                t0 = time.perf_counter()
                logits = self._run(ids[t:t + 1], "decode")
                dt = time.perf_counter() - t0
                self.timing.decode_s += dt
                self.timing.decode_tokens += 1
                self.timing.calls.append(("decode", dt))
            out.append(logits)
            self.pos += take
            t += take
        return np.concatenate(out)


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    m = logits.max(-1, keepdims=True)
    return m[:, 0] + np.log(np.exp(logits - m).sum(-1)) - logits[np.arange(len(targets)), targets]


def predict_ane(path: str | Path, token_ids: np.ndarray, compute_units: str = "ALL", backend: str = "auto",
                prefill: int | None = None):
    """Perplexity over windows of the export's context: the first ``prefill`` tokens of each window
    (default: half) through ``prefill``, the rest through ``decode``; per-token latency of each."""
    from converters.predict import PredictResult

    s = AneSession(path, compute_units, backend)
    token_ids = np.asarray(token_ids).reshape(-1)
    if token_ids.size < 2:
        raise MacqError("perplexity needs at least 2 tokens")
    nll = []
    for start in range(0, token_ids.size - 1, s.context):
        win = token_ids[start:start + s.context + 1]
        s.reset()
        n_in = len(win) - 1
        p = max(1, min(n_in, prefill if prefill is not None else n_in // 2))
        logits = [s.feed(win[:p]), s.feed(win[p:n_in], prefill=False)] if p < n_in else [s.feed(win[:p])]
        nll.append(_nll(np.concatenate(logits), win[1:]))
    tm = s.timing
    notes = [] if s.backend == "coreml" else ["backend=mil: numpy value inference (graph check); latency is not device latency"]
    return PredictResult(backend=s.backend, compute_units=compute_units if s.backend == "coreml" else "n/a",
                         n_tokens=int(sum(len(x) for x in nll)), perplexity=float(np.exp(np.concatenate(nll).mean())),
                         prefill_ms_per_token=1e3 * tm.prefill_s / max(tm.prefill_tokens, 1),
                         decode_ms_per_token=1e3 * tm.decode_s / max(tm.decode_tokens, 1), notes=notes)


def generate_ane(path: str | Path, prompt_ids: np.ndarray, max_tokens: int, eos: int | None = None,
                 compute_units: str = "ALL", backend: str = "auto") -> tuple[list[int], Timing]:
    """Greedy continuation of ``prompt_ids``: prompt through ``prefill``, each new token through ``decode``."""
    s = AneSession(path, compute_units, backend)
    prompt_ids = np.asarray(prompt_ids).reshape(-1)
    if prompt_ids.size == 0:
        raise MacqError("generate: empty prompt")
    logits = s.feed(prompt_ids)[-1]
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(np.argmax(logits))
        if eos is not None and nxt == eos:
            break
        out.append(nxt)
        if s.pos >= s.context:
            break
        logits = s.feed(np.array([nxt]), prefill=False)[-1]
    return out, s.timing

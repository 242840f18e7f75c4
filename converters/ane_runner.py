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
from typing import Callable

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
        mask = causal_mask(n, self.pos, self.manifest.mask_len)
        ids_feed = {"input_ids": ids.reshape(1, n).astype(np.int32)}
        hidden, logits = None, {}
        for i, c in enumerate(self.manifest.chunks):
            feed = dict(ids_feed) if c.embed else {"hidden": hidden}
            if c.stop > c.start:
                feed.update(position_ids=pos, causal_mask=mask)
            out = self._call(i, fn, feed)
            if "hidden_out" in out:
                h = np.asarray(out["hidden_out"], dtype=np.float16)
                # embedding packages split by vocabulary part: each token's row comes from one, zeros from the rest
                hidden = hidden + h if c.embed and c.stop == c.start and hidden is not None else h
            logits.update({k: v for k, v in out.items() if k.startswith("logits_")})
        parts = [np.asarray(logits[f"logits_{j}"], dtype=np.float32)[0] for j in range(len(self.manifest.vocab_parts))]
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
                prefill: int | None = None, decode: int | None = None, context: int | None = None,
                stride: int | None = None,
                reference: Callable[[np.ndarray], np.ndarray] | None = None, session: AneSession | None = None):
    """Perplexity over macq's evaluation windows (:func:`macq.eval.perplexity.windows`, the same tokens scored
    as in the torch and MLX evaluators) of ``context`` tokens (default and maximum: the export's context).
    Per window, the first ``prefill`` tokens (or all but the last ``decode``; default: half) go through
    ``prefill``, the rest through ``decode``, one token per call; per-token latency of each. With
    ``reference`` (window ids -> float logits ``[n, vocab]``, e.g. the float model), also KL(p_ref || p)
    and top-1 agreement on the scored tokens. ``session``: an already open session with the same interface (the
    Core AI runner, :class:`coreai_backend.runner.CoreAISession`) instead of opening ``path``."""
    import torch

    from converters.predict import PredictResult
    from macq.eval.agreement import token_stats
    from macq.eval.perplexity import windows

    if decode is not None and decode < 0:
        raise MacqError(f"--decode-tokens {decode}: expected >= 0")
    s = session if session is not None else AneSession(path, compute_units, backend)
    context = s.context if context is None else context
    if not 2 <= context <= s.context:
        raise MacqError(f"--context {context}: expected 2..{s.context} (the export's fixed context)")
    token_ids = np.asarray(token_ids).reshape(-1)
    nll, kl, top1 = [], [], []
    for w in windows(token_ids.size, context, stride):
        win = token_ids[w.begin:w.end]
        s.reset()
        p = prefill if prefill is not None else w.length - decode if decode is not None else w.length // 2
        p = max(1, min(w.length, p))
        parts = [s.feed(win[:p])] + ([s.feed(win[p:], prefill=False)] if p < w.length else [])
        logits = np.concatenate(parts)[w.offset:w.offset + w.n_scored]
        nll.append(_nll(logits, token_ids[w.score_from:w.end]))
        if reference is not None:
            ref = np.asarray(reference(win), dtype=np.float32)[w.offset:w.offset + w.n_scored]
            k, t, _ = token_stats(torch.log_softmax(torch.from_numpy(ref), -1),
                                  torch.log_softmax(torch.from_numpy(logits.astype(np.float32)), -1))
            kl.append(k)
            top1.append(t)
    tm = s.timing
    notes = list(getattr(s, "notes", None) or ([] if s.backend == "coreml" else
                                                ["backend=mil: numpy value inference (graph check); latency is not device latency"]))
    compute_units = getattr(s, "compute_units", compute_units) if session is not None else compute_units
    nll_all = np.concatenate(nll)
    res = PredictResult(backend=s.backend, compute_units=compute_units if s.backend in ("coreml", "coreai") else "n/a",
                        n_tokens=int(nll_all.size), perplexity=float(np.exp(nll_all.mean())),
                        prefill_ms_per_token=1e3 * tm.prefill_s / tm.prefill_tokens if tm.prefill_tokens else None,
                        decode_ms_per_token=1e3 * tm.decode_s / tm.decode_tokens if tm.decode_tokens else None,
                        notes=notes)
    if nll_all.size > 1:
        res.ppl_stderr = res.perplexity * float(nll_all.std(ddof=1) / np.sqrt(nll_all.size))
    if reference is not None:
        res.kl = float(torch.cat(kl).double().mean())
        res.top1 = float(torch.cat(top1).double().mean())
    return res


def generate_ane(path: str | Path, prompt_ids: np.ndarray, max_tokens: int, eos: int | None = None,
                 compute_units: str = "ALL", backend: str = "auto",
                 session: AneSession | None = None) -> tuple[list[int], Timing]:
    """Greedy continuation of ``prompt_ids``: prompt through ``prefill``, each new token through ``decode``
    (``session``: an open session to use instead of opening ``path``)."""
    s = session if session is not None else AneSession(path, compute_units, backend)
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

"""learned's logits stage, streamed: every record's per-group scales tuned against the float model's logits
(:mod:`macq.quantizers.learned_kl`, the same Adam on log-scales with keep-best on held-out KL) with one decoder
layer in memory at a time.

What the in-memory stage holds at once, this one holds per layer: the quantized layers (codes, scales, folded
norms) wait on disk after the block-wise pass (:class:`LayerFiles`) and are read for each pass; only the
log-scales, their Adam state and gradients stay in memory (four floats per group: 16 bytes per 64 weights).
Each step runs the batch forward through every layer (keeping each layer's input: ``seq_len x hidden`` floats),
the head one vocabulary chunk at a time, then every layer in reverse, rerun with autograd, its scales receiving
their gradient (:mod:`macq.quantizers.stream_grad`). The teacher is not a ``[seq_len, vocab]`` table per row:
the float model's normed final hidden states and log-sum-exp are kept, and its log-probs are made per chunk
from the float head's rows (rounded to fp16 as the in-memory stage stores them).

The token embedding is looked up directly (rows of the dequantized embedding, times the family's embedding
scale); families with learned position embeddings (GPT-2) keep the in-memory stage.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from macq.progress import stage, with_backward
from macq.quantizers.calibration import _to, layer_out
from macq.quantizers.learned_kl import ScaleParams, _scale, dequantized, from_record, to_record, tunable
from macq.quantizers.stream_grad import HEAD_ROWS, LayerFiles, LayerStream, chunked_logit_grads, chunked_lse, counted_mm
from macq.record import record_to


class _Student:
    """The quantized model as the stage sees it: log-scale leaves by record name (on the stream's device), codes
    read per layer (from the CPU files, onto the device)."""

    def __init__(self, stream: LayerStream, files: LayerFiles, heads: dict[str, Any]):
        self.stream, self.files, self.heads, self.device = stream, files, heads, stream.device
        self.leaves: dict[str, torch.Tensor] = {}
        self.head_params = {n: self._param(n, r) for n, r in heads.items() if tunable(r)}
        self.float_head = (stream.spec.embed if stream.tied else stream.spec.lm_head) not in heads
        self.layer_leaves: list[list[str]] = []       # names of each layer's tunable records
        for i in range(len(files.paths)):
            recs, _ = files.load(i)
            self.layer_leaves.append([n for n, r in recs.items() if tunable(r)])
            for n in self.layer_leaves[-1]:
                self.leaves[n] = recs[n].scales.float().log().to(self.device).requires_grad_(True)

    def _param(self, name: str, rec: Any) -> ScaleParams:
        p = from_record(record_to(rec, self.device))
        p.log_scale = self.leaves.setdefault(name, p.log_scale.requires_grad_(True))
        return p

    def layer_weights(self, i: int, path: str) -> dict[str, torch.Tensor]:
        """Layer ``i``'s parameters by name relative to the layer (differentiable in its leaves)."""
        recs, floats = self.files.load(i)
        out = {k[len(path) + 1:]: v.to(self.device, torch.float32) for k, v in floats.items()}
        for n, r in recs.items():
            out[f"{n[len(path) + 1:]}.weight"] = dequantized(self._param(n, r)) if tunable(r) else \
                record_to(r, self.device).dequantize()
        return out

    def head_rows(self, a: int, b: int) -> torch.Tensor:
        s = self.stream
        name = s.spec.embed if s.tied else s.spec.lm_head
        p = self.head_params.get(name)
        if p is not None:
            return _rows(p, slice(a, b))
        if name in self.heads:
            return self.heads[name].dequantize(torch.float32)[a:b].to(self.device)
        return s.head_rows(a, b)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """First-layer input ``[1, T, H]`` for one row (differentiable in the embedding's leaf)."""
        s = self.stream
        name = s.spec.embed
        p = self.head_params.get(name)
        rows, inv = torch.unique(ids, return_inverse=True)
        if p is not None:
            w = _rows(p, rows)
        elif name in self.heads:
            w = self.heads[name].dequantize(torch.float32)[rows].to(self.device)
        else:
            w = torch.stack([s.plan.store.get_rows(f"{name}.weight", int(r), int(r) + 1)[0] for r in rows])
            w = w.to(self.device, torch.float32)
        scale = float(s.model.config.hidden_size) ** 0.5 if s.spec.embed_scale == "sqrt_hidden" else 1.0
        return (w[inv] * scale)[None] if scale != 1.0 else w[inv][None]

    def records(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().to("cpu", copy=True) for n, t in self.leaves.items()}


def _rows(p: ScaleParams, rows: slice | torch.Tensor) -> torch.Tensor:
    """Rows of a non-transposed record's dequantized weight (differentiable in ``p.log_scale``)."""
    codes = p.codes[rows]
    return (_scale(p, rows).unsqueeze(-1) * (codes.float() - p.zero[rows])).reshape(codes.shape[0], -1)


class _Teacher:
    """The float model on the stage's rows: normed final hidden states, log-sum-exp and per-position probability
    mass of its fp16 log-probs; :meth:`logprobs` makes a chunk's log-probs as the in-memory stage stores them."""

    def __init__(self, stream: LayerStream, ids: torch.Tensor):
        self.stream = stream
        inputs = stream.capture(ids)
        self.kwargs = inputs.kwargs
        _, final = stream.forward(inputs, keep=False)
        self.norm = stream.final_norm()
        chunks = [(a, min(a + HEAD_ROWS, stream.vocab)) for a in range(0, stream.vocab, HEAD_ROWS)]
        with torch.no_grad():                 # each chunk of the head read once per pass for all rows
            self.hn = [self.norm(h.to(stream.device))[0] for h in final]
            self.lse, _ = chunked_lse(self.hn, stream.head_rows, stream.vocab)
            self.mass = [0] * len(self.hn)
            for a, b in chunks:
                w = stream.head_rows(a, b)
                self.mass = [m + self.logprobs(s, a, b, w).exp().sum(-1) for s, m in enumerate(self.mass)]

    def logprobs(self, s: int, a: int, b: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Row ``s``'s log-probs over vocabulary ``[a, b)``; ``rows``: the float head's rows there, when the
        caller has just read them (the student's head is the float one unless the head is quantized)."""
        w = rows if rows is not None else self.stream.head_rows(a, b)
        return (counted_mm(self.hn[s], w.t()) - self.lse[s][:, None]).half().float()


class _Stage:
    def __init__(self, student: _Student, teacher: _Teacher, ids: torch.Tensor):
        self.st, self.tc, self.ids = student, teacher, ids
        self.stream = student.stream

    def forward(self, r: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Row ``r`` through every quantized layer: each layer's input and the final hidden states."""
        s = self.stream
        kw = _to(self.tc.kwargs[r], s.device)
        xs, h = [], self.st.embed(self.ids[r]).detach()
        with torch.no_grad(), stage("forward"):
            for i in range(len(s.layers)):
                xs.append(h)
                h = layer_out(s.layers[i], self.st.layer_weights(i, f"{s.spec.layers}.{i}"), h, kw).detach()
        return xs, h

    @torch.no_grad()
    def kl(self, r: int) -> float:
        """Token-mean KL(teacher || student) on row ``r``, as :func:`~macq.quantizers.learned_kl.heldout_kl`."""
        _, h = self.forward(r)
        with stage("head"):
            hn = self.tc.norm(h)[0]
            vocab = self.stream.vocab
            (lse,), logits = chunked_lse([hn], self.st.head_rows, vocab, keep=True)   # this row's logits, made once
            total = torch.zeros(hn.shape[0], device=hn.device)
            for a in range(0, vocab, HEAD_ROWS):
                t = self.tc.logprobs(r, a, min(a + HEAD_ROWS, vocab))
                total += (t.exp() * (t - (logits.pop((0, a)) - lse[:, None]))).sum(-1)
        return float(total.mean())

    def backward(self, r: int, weight: float) -> None:
        """Add ``weight`` x the gradient of row ``r``'s KL to every leaf's ``.grad``."""
        s, st = self.stream, self.st
        xs, h = self.forward(r)
        kw = _to(self.tc.kwargs[r], s.device)
        with stage("head"):
            h = h.clone().requires_grad_(True)
            with torch.enable_grad():
                hn = self.tc.norm(h)[0]
            hd = hn.detach()

            def head_grad(_s: int, a: int, b: int, g: torch.Tensor) -> None:
                if st.head_params:
                    with torch.enable_grad():
                        st.head_rows(a, b).backward(weight * counted_mm(g.t(), hd))

            last: list[torch.Tensor] = []

            def rows(a: int, b: int) -> torch.Tensor:
                last[:] = [st.head_rows(a, b)]
                return last[0]

            def target(_s: int, a: int, b: int) -> torch.Tensor:   # a float head: the chunk just read is the teacher's
                return self.tc.logprobs(r, a, b, last[0] if st.float_head else None).exp()

            g_hn, _ = chunked_logit_grads([hd], rows, s.vocab, target, [self.tc.mass[r]], [float(hd.shape[0])],
                                          head_grad, keep=True)
            last.clear()
            g = torch.autograd.grad(hn, h, weight * g_hn[0])[0]
        with stage("backward"):
            for i in reversed(range(len(s.layers))):
                x = xs[i].clone().requires_grad_(True)
                with torch.enable_grad(), with_backward():
                    w = st.layer_weights(i, f"{s.spec.layers}.{i}")
                    out = layer_out(s.layers[i], w, x, kw)
                    torch.autograd.backward(out, g, inputs=[x, *[st.leaves[n] for n in st.layer_leaves[i]]])
                g = x.grad
        if s.spec.embed in st.head_params:
            with torch.enable_grad():
                st.embed(self.ids[r]).backward(g)


def tune_logits_streamed(stream: LayerStream, files: LayerFiles, heads: dict[str, Any], ids: torch.Tensor, *,
                         steps: int, lr: float, batch_size: int, eval_every: int, holdout: int, seed: int,
                         progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`~macq.quantizers.learned_kl.tune_logits` over ``files`` (the layers' records, rewritten in place
    with the best scales) and ``heads`` (returned, tuned); same sampling, optimiser and keep-best."""
    with stage("target"):
        teacher = _Teacher(stream, ids)
    student = _Student(stream, files, heads)
    run = _Stage(student, teacher, ids)
    n = ids.shape[0]
    train = list(range(n - holdout)) if holdout else list(range(n))
    held = list(range(n - holdout, n)) if holdout else train

    def heldout() -> float:
        return sum(run.kl(r) for r in held) / max(len(held), 1)

    init = heldout()
    best, best_step, best_state = init, 0, student.records()
    opt = torch.optim.Adam(list(student.leaves.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.monotonic()
    for step in range(1, steps + 1):
        rows = [train[int(i)] for i in torch.randint(len(train), (batch_size,), generator=gen)]
        opt.zero_grad(set_to_none=True)
        for r in rows:
            run.backward(r, 1.0 / len(rows))
        with stage("tune"):
            opt.step()
        if progress:
            print(f"  logits KL stage (streamed): step {step}/{steps} done, {time.monotonic() - t0:.0f} s", flush=True)
        if step % eval_every == 0 or step == steps:
            kl = heldout()
            if kl < best:
                best, best_step, best_state = kl, step, student.records()
            if progress:
                print(f"  logits KL stage (streamed): step {step}/{steps}, held-out KL {kl:.4f} "
                      f"(start {init:.4f}, best {best:.4f} at step {best_step})", flush=True)
    with stage("io"):
        for i in range(len(files.paths)):
            recs, floats = files.load(i)
            files.save(i, {k: _tuned(r, best_state.get(k)) for k, r in recs.items()}, floats)
    out = {k: _tuned(r, best_state.get(k)) for k, r in heads.items()}
    return out, {"kl_init": init, "kl": best, "best_step": best_step, "heldout_rows": len(held) if holdout else 0}


def _tuned(rec: Any, log_scale: torch.Tensor | None) -> Any:
    if log_scale is None or not tunable(rec):
        return rec
    p = from_record(rec)
    p.log_scale = log_scale
    return to_record(p)

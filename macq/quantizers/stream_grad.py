"""Gradients through a checkpoint held one decoder layer at a time: the backward passes of kmeans-cal's Fisher
sensitivities and learned's logits stage, without the whole model in memory.

Why: both are gradients of a loss on the final logits (next-token cross-entropy, or the KL to the float model)
with respect to every linear, which the in-memory paths get from one autograd graph over the whole model (an 8B
model in float32 is 32 GB before the graph). The chain rule needs far less: the gradient reaching layer ``i``'s
output, that layer's input and its weights. So:

1. forward: the first layer's inputs are captured (one entry per calibration sequence), then each decoder layer is
   read, run on every sequence, and its *inputs* kept (an :class:`~macq.quantizers.activations.ActivationStore`,
   spilling to disk under ``--max-memory``); the last layer's outputs are the final hidden states;
2. the head: the final norm, then the logits one vocabulary chunk at a time (``HEAD_ROWS`` rows of the head read
   from the checkpoint), twice: first the log-sum-exp of every token, then each chunk's softmax gradient
   ``(p - target) / tokens`` times the chunk's rows. A 128k-token vocabulary's logits are never whole;
3. reverse: for each layer from the last, read it again, rerun it on its stored inputs with autograd, and
   backpropagate the gradient that reached its output: what its weights receive, and what its input passes on
   to the layer below. One layer's graph, for one sequence, at a time.

Each layer is read twice (forward, reverse); the products are those of one forward and one backward plus one
recomputed forward, the price of checkpointing every layer. Equal to the in-memory autograd to float32 rounding
(tests: the Fisher diagonal against :func:`~macq.quantizers.sensitivity.fisher_diagonal`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from macq.errors import MacqError
from macq.models import is_conv1d
from macq.perf import matmul_flops
from macq.progress import LayerLog, add_flops, stage, with_backward
from macq.quantizers.activations import ActivationStore, Budget
from macq.quantizers.calibration import LayerInputs, _to, capture_first_layer_inputs, layer_out, plain
from macq.quantizers.meta_layers import _move_buffers, _set_param, materialize, release
from macq.streaming import StreamPlan, finite

HEAD_ROWS = 16384   # vocabulary rows of the head per chunk: 16384 x 4096 x 4 B = 256 MiB at the widest shapes


class LayerStream:
    """A meta skeleton over a checkpoint: the modules before the first layer, each decoder layer and the head
    read on demand, in float32 on ``device``; per-sequence inputs of every layer kept in ``budget``."""

    def __init__(self, plan: StreamPlan, model: nn.Module, device: torch.device, budget: Budget,
                 overrides: dict[str, torch.Tensor] | None = None):
        from macq.arch import arch_spec

        self.plan, self.model, self.device, self.budget = plan, model, device, budget
        self.overrides = overrides or {}    # embedding / lm_head weights already quantized (dequantized here)
        self.progress = False               # a progress line per layer of each pass
        self.description = "gradients"
        self.spec = arch_spec(model)
        self.layers = model.get_submodule(self.spec.layers)
        if getattr(model.config, "final_logit_softcapping", None):
            raise MacqError("streamed gradients: logit soft-capping is not supported; pass --no-stream")
        from macq.models import tied_embeddings

        self.tied = tied_embeddings(model)
        self.head_key = f"{self.spec.embed if self.tied else self.spec.lm_head}.weight"
        self.vocab = plan.store.shape(self.head_key)[0]

    @contextmanager
    def layer(self, i: int) -> Iterator[tuple[str, nn.Module]]:
        path, layer = f"{self.spec.layers}.{i}", self.layers[i]
        with stage("io"):
            materialize(layer, path + ".", self.plan.store, self.device)
        try:
            yield path, layer
        finally:
            release(layer)

    def outer(self, embed: torch.Tensor | None = None) -> list[str]:
        """Materialize the parameters before the first layer (``embed``: the embedding's weight instead of the
        checkpoint's); returns their names, for :meth:`drop`."""
        early = tuple(n + "." for n in (self.spec.lm_head, self.spec.final_norm) if n)
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)
                 if not n.startswith(self.plan.layers_prefix) and not n.startswith(early)]
        given = {f"{self.spec.embed}.weight": embed} if embed is not None else {}
        for n in names:
            t = given.get(n)
            _set_param(self.model, n, t if t is not None else finite(n, self.plan.store[n]).to(self.device, torch.float32))
        _move_buffers(self.model, self.plan.layers_prefix, self.device)
        return names

    def drop(self, names: list[str]) -> None:
        for n in names:
            _set_param(self.model, n, torch.empty_like(self.model.get_parameter(n), device="meta"))

    def capture(self, ids: torch.Tensor) -> LayerInputs:
        """The first layer's inputs, one entry per row of ``ids``."""
        names = self.outer(self.overrides.get(self.spec.embed))
        try:
            with stage("capture"):
                inputs = LayerInputs(hidden=ActivationStore(torch.float32, self.budget), storage=torch.device("cpu"))
                capture_first_layer_inputs(self.model, ids, 1, self.device, offload=True, into=inputs)
                inputs.kwargs = [plain(kw) for kw in inputs.kwargs]   # autograd saves rotary tables for backward
        finally:
            self.drop(names)
        return inputs

    def forward(self, inputs: LayerInputs, keep: bool = True) -> tuple[list[ActivationStore], list]:
        """Every layer's inputs (``[i][s]``; none unless ``keep``) and the final hidden states, per sequence."""
        stores, hidden = [], inputs.hidden
        log = self.log("forward")
        for i in range(len(self.layers)):
            log.layer(i, "forward")
            if keep:
                stores.append(hidden)
            nxt = ActivationStore(torch.float32, self.budget)
            with self.layer(i) as (path, layer), torch.no_grad(), stage("forward"):
                for s in range(len(hidden)):
                    nxt.append(layer_out(layer, {}, hidden[s].to(self.device), _to(inputs.kwargs[s], self.device)))
            if not keep:
                hidden.release()
            hidden = nxt
        log.done()
        return stores, [hidden[s] for s in range(len(hidden))]

    def log(self, what: str) -> LayerLog:
        return LayerLog(len(self.layers), f"{self.description} ({what})", enabled=self.progress)

    def head_rows(self, a: int, b: int) -> torch.Tensor:
        name = self.spec.embed if self.tied else self.spec.lm_head
        if name in self.overrides:
            return self.overrides[name][a:b].to(self.device)
        return self.plan.store.get_rows(self.head_key, a, b).to(self.device, torch.float32)

    def final_norm(self) -> nn.Module:
        norm = self.model.get_submodule(self.spec.final_norm)
        materialize(norm, self.spec.final_norm + ".", self.plan.store, self.device)
        return norm


def counted_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, charged to the running stage: the head's products are plain matmuls outside any module, which
    the forward hook would not see."""
    add_flops(matmul_flops(a.shape[0], a.shape[1], b.shape[1]))
    return a @ b


@torch.no_grad()
def chunked_lse(hn: list[torch.Tensor], rows: Callable[[int, int], torch.Tensor], vocab: int, keep: bool = False
                ) -> tuple[list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]:
    """Each sequence's log-sum-exp over the vocabulary ``[T]``, one chunk of head rows at a time (each chunk read
    once for all sequences); with ``keep`` also the logits by ``(sequence, chunk start)``, else an empty dict."""
    lse = [torch.full(h.shape[:1], float("-inf"), device=h.device) for h in hn]
    kept: dict[tuple[int, int], torch.Tensor] = {}
    for a in range(0, vocab, HEAD_ROWS):
        w = rows(a, min(a + HEAD_ROWS, vocab))
        for s, h in enumerate(hn):
            z = counted_mm(h, w.t())
            if keep:
                kept[s, a] = z
            lse[s] = torch.logaddexp(lse[s], torch.logsumexp(z, -1))
    return lse, kept


def chunked_logit_grads(hn: list[torch.Tensor], rows: Callable[[int, int], torch.Tensor], vocab: int,
                        target: Callable[[int, int, int], torch.Tensor], pos_weight: list[torch.Tensor],
                        count: list[float], weight_grad: Callable[[int, int, int, torch.Tensor], None] | None = None,
                        keep: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The gradient of each sequence's loss ``Σ_t (w_t·lse_t - Σ_v target_tv·logit_tv) / count`` (cross-entropy
    to a one-hot target, or, to the float model's probabilities, the KL up to a constant) with respect to its
    normed hidden states ``hn[s] [T, H]``; the logits ``hn @ Wᵀ`` are made one chunk of vocabulary rows at a time.
    ``target(s, a, b)``: the target's columns ``[a, b)`` for sequence ``s`` ``[T, b - a]``, each row summing to
    ``pos_weight[s][t]`` over the vocabulary (0 leaves a position out); ``count[s]``: the positions averaged over.
    ``weight_grad(s, a, b, G)`` receives each
    chunk's logit gradient ``G [T, b - a]``: ``Gᵀ @ hn[s]`` is that sequence's gradient of the head rows.
    ``keep``: hold the first pass's logits for the second (``T x vocab`` floats per sequence) instead of making
    them again: one product of the head fewer per sequence, for a caller with one or two sequences.
    Returns the gradients and each sequence's log-sum-exp ``[T]``."""
    with torch.no_grad():
        lse, kept = chunked_lse(hn, rows, vocab, keep)
        grads = [torch.zeros_like(h) for h in hn]
        for a in range(0, vocab, HEAD_ROWS):
            b = min(a + HEAD_ROWS, vocab)
            w = rows(a, b)
            for s, h in enumerate(hn):
                pw = pos_weight[s]
                z = kept.pop((s, a)) if keep else counted_mm(h, w.t())
                g = (torch.exp(z - lse[s][:, None]) * pw[:, None] - target(s, a, b)) / count[s]
                grads[s] += counted_mm(g, w)
                if weight_grad is not None:
                    weight_grad(s, a, b, g)
    return grads, lse


def next_token_target(ids: torch.Tensor, device: torch.device) -> tuple[Callable[[int, int, int], torch.Tensor], list[torch.Tensor],
                                                   list[float]]:
    """The causal-LM labels of ``ids [N, T]`` (position ``t`` predicts token ``t + 1``; the last predicts
    nothing), as :func:`chunked_logit_grads` takes them: the mean over ``T - 1`` positions, as transformers'
    ``loss`` with ``labels=ids``. The targets and weights are made on ``device``, where the logits are."""
    n, t = ids.shape
    nxt = ids[:, 1:]
    weight = torch.ones(t, device=device)
    weight[-1] = 0.0

    def target(s: int, a: int, b: int) -> torch.Tensor:
        out = torch.zeros(t, b - a, device=device)
        hit = (nxt[s] >= a) & (nxt[s] < b)
        pos = torch.nonzero(hit).flatten()
        out[pos, nxt[s][pos] - a] = 1.0
        return out

    return target, [weight] * n, [float(t - 1)] * n


class LayerFiles:
    """The quantized decoder layers (records and float tensors, by full name) one file each, in order."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.paths: list[Path] = []

    def add(self, records: dict[str, Any], floats: dict[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"layer-{len(self.paths):05d}.pt"
        torch.save({"records": records, "floats": floats}, path)
        self.paths.append(path)

    def load(self, i: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        d = torch.load(self.paths[i], weights_only=False)     # macq's own file, written by add()
        return d["records"], d["floats"]

    def save(self, i: int, records: dict[str, Any], floats: dict[str, torch.Tensor]) -> None:
        torch.save({"records": records, "floats": floats}, self.paths[i])


class FisherStore:
    """Fisher diagonals written one decoder layer at a time under ``directory`` (a file per layer), read back
    when the quantizer pops them, in the same layer order; the heads' stay in memory."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory           # None: a fresh name in the run's spill directory (stream_fisher)
        self.files: dict[str, Path] = {}
        self.held: dict[str, torch.Tensor] = {}

    def put_layer(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"fisher-{i:05d}.pt"
        torch.save(tensors, path)
        self.files.update(dict.fromkeys(tensors, path))

    def pop(self, name: str) -> torch.Tensor:
        if name not in self.held:
            path = self.files.get(name)
            if path is None:
                raise MacqError(f"kmeans-cal: no Fisher diagonal for {name}")
            self.held.update(torch.load(path))
            path.unlink()
        self.files.pop(name, None)
        return self.held.pop(name)


def stream_fisher(stream: LayerStream, ids: torch.Tensor, modules: set[str], heads: set[str],
                  into: FisherStore) -> None:
    """The empirical Fisher diagonal (mean over the rows of ``ids`` of the squared gradient of each row's mean
    next-token loss, ``[out, in]`` like the weights) of the decoder linears ``modules`` into ``into`` layer by
    layer, and of the ``heads`` (embedding / lm_head names; a tied pair is one weight, both contributions in
    one gradient before squaring) into ``into.held``: what :func:`~macq.quantizers.sensitivity.fisher_diagonal`
    computes in memory."""
    spec, n = stream.spec, ids.shape[0]
    if into.directory is None:
        into.directory = stream.budget.new_file()
    inputs = stream.capture(ids)
    kwargs = inputs.kwargs
    stores, final = stream.forward(inputs)
    norm = stream.final_norm()
    target, pos_weight, count = next_token_target(ids, stream.device)
    tied = stream.tied
    head_w = spec.lm_head in heads and not tied
    head_f = torch.zeros(stream.vocab, final[0].shape[-1]) if head_w else None

    with stage("head"):
        final = [h.to(stream.device).clone().requires_grad_(True) for h in final]
        with torch.enable_grad():
            hn = [norm(h)[0] for h in final]   # [1, T, H] -> [T, H]
        detached = [h.detach() for h in hn]

        def head_grad(s: int, a: int, b: int, g: torch.Tensor) -> None:
            head_f[a:b] += counted_mm(g.t(), detached[s]).pow(2).cpu()

        g_hn, _ = chunked_logit_grads(detached, stream.head_rows, stream.vocab, target, pos_weight, count,
                                      head_grad if head_w else None)
        grads = [torch.autograd.grad(h, x, g)[0].detach() for h, x, g in zip(hn, final, g_hn)]
    release(norm)
    del final, hn
    if head_f is not None:
        into.held[spec.lm_head] = head_f / n

    log = stream.log("backward")
    for i in reversed(range(len(stream.layers))):
        log.layer(i, "backward")
        with stream.layer(i) as (path, layer), stage("backward"):
            names = sorted(m for m in modules if m.startswith(path + "."))
            ws = [layer.get_submodule(m[len(path) + 1:]).weight for m in names]
            acc = [torch.zeros_like(w) for w in ws]
            for s in range(n):
                x = stores[i][s].to(stream.device).clone().requires_grad_(True)
                with torch.enable_grad(), with_backward():
                    out = layer_out(layer, {}, x, _to(kwargs[s], stream.device))
                    got = torch.autograd.grad(out, [x, *ws], grads[s])
                grads[s] = got[0].detach()
                for a, g in zip(acc, got[1:]):
                    a += g.pow(2)
            stores[i].release()
            into.put_layer(i, {m: _linear_view(layer.get_submodule(m[len(path) + 1:]), a / n).cpu()
                               for m, a in zip(names, acc)})
    log.done()

    emb_name = spec.embed
    if emb_name not in heads and not (tied and spec.lm_head in heads):
        return
    with stage("head"):
        scale = float(stream.model.config.hidden_size) ** 0.5 if spec.embed_scale == "sqrt_hidden" else 1.0
        sparse = []
        for s in range(n):
            rows, inv = torch.unique(ids[s], return_inverse=True)
            g = torch.zeros(len(rows), grads[s].shape[-1]).index_add_(0, inv, grads[s][0].cpu() * scale)
            sparse.append((rows, g))
        emb_f = torch.zeros(stream.vocab if tied else stream.plan.store.shape(f"{emb_name}.weight")[0],
                            grads[0].shape[-1])
        if tied:
            def tied_grad(s: int, a: int, b: int, g: torch.Tensor) -> None:
                full = counted_mm(g.t(), detached[s]).cpu()
                rows, ge = sparse[s]
                hit = (rows >= a) & (rows < b)
                full.index_add_(0, rows[hit] - a, ge[hit])
                emb_f[a:b] += full.pow(2)

            chunked_logit_grads(detached, stream.head_rows, stream.vocab, target, pos_weight, count, tied_grad)
        else:
            for rows, ge in sparse:
                emb_f[rows] += ge.pow(2)
        for name in (emb_name, spec.lm_head) if tied else (emb_name,):
            if name in heads:
                into.held[name] = emb_f / n


def _linear_view(mod: nn.Module, f: torch.Tensor) -> torch.Tensor:
    return f.t() if is_conv1d(mod) else f

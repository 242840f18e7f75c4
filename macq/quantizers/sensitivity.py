"""How much each layer suffers at each candidate format: the allocator's error table.

Two measures, one table type (:class:`SensitivityTable`, rows = allocation units, columns = formats):

* :func:`proxy_sensitivity` (cheap, every layer x every format): the layer-output error GPTQ minimises,
  ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` with ``H = 2/n·Σ xxᵀ`` of that layer's calibration inputs, collected in one
  layerwise pass (float weights throughout). Cost: one calibration pass plus one ``[out,in]x[in,in]``
  matmul per layer per format. Outside the decoder stack: the lm_head uses its input's ``H``; the token
  embedding (one-hot inputs) weighs each row's error by its token frequency; a tied embedding pays both.
  Errors of different layers are summed as if additive and equally important per unit of output error;
  that is the proxy's assumption (checked against KL by Spearman rank correlation in the bench).
* :func:`fisher_sensitivity` (cheap, every layer x every format): ``½·Σ F ⊙ (W − Ŵ)²`` with the empirical
  Fisher diagonal from one backward per calibration sequence: the loss increase, downstream effects included.
* :func:`kl_sensitivity` (the seeds' method, expensive): the mean KL(p_fp || p_q) of the next-token
  distribution on calibration windows when that unit *alone* is quantized at that format: one model forward
  per unit per format, so offer it a small candidate set or coarse units (``layer``/``sublayer``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from macq.arch import arch_spec
from macq.errors import MacqError
from macq.models import get_weight, is_conv1d, set_weight, tied_embeddings
from macq.progress import stage, track
from macq.quantizers.formats import Format

GRANULARITIES = ("module", "sublayer", "layer")


@dataclass
class SensitivityTable:
    """``errors[u, f]`` for unit ``u`` at format ``f``; ``bpw[u, f]`` its exact cost (``inf``: does not fit)."""

    units: list[str]
    members: dict[str, list[str]]            # unit -> module paths
    formats: list[Format]
    errors: torch.Tensor                     # float64 [U, F]
    bpw: torch.Tensor                        # float64 [U, F]
    sizes: list[int]                         # weights per unit
    kind: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "formats": [f.name for f in self.formats],
                "errors": {u: self.errors[i].tolist() for i, u in enumerate(self.units)},
                "bpw": {u: self.bpw[i].tolist() for i, u in enumerate(self.units)}, "notes": self.notes}

    def grouped(self, units: dict[str, list[str]]) -> "SensitivityTable":
        """Coarser units: errors summed (the additivity assumption), costs size-weighted."""
        index = {m: i for i, u in enumerate(self.units) for m in self.members[u]}
        rows, bits, sizes = [], [], []
        for u, mods in units.items():
            idx = torch.tensor([index[m] for m in mods])
            n = torch.tensor([self.sizes[i] for i in idx.tolist()], dtype=torch.float64)
            rows.append(self.errors[idx].sum(0))
            bits.append((self.bpw[idx] * n[:, None]).sum(0) / n.sum())
            sizes.append(int(n.sum()))
        return SensitivityTable(list(units), {u: list(m) for u, m in units.items()}, self.formats,
                                torch.stack(rows), torch.stack(bits), sizes, self.kind, list(self.notes))


def make_units(names: list[str], granularity: str, layers_prefix: str) -> dict[str, list[str]]:
    """Group module paths: each alone (``module``), per attention / MLP block (``sublayer``) or per decoder
    layer (``layer``). Modules outside the decoder stack are always their own unit."""
    if granularity not in GRANULARITIES:
        raise MacqError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    pat = re.compile(re.escape(layers_prefix) + r"\.(\d+)\.([^.]+)")
    units: dict[str, list[str]] = {}
    for n in names:
        m = pat.match(n)
        key = n if granularity == "module" or not m else (
            f"{layers_prefix}.{m.group(1)}" + ("" if granularity == "layer" else f".{m.group(2)}"))
        units.setdefault(key, []).append(n)
    return units


def _cost_table(shapes: list[tuple[int, int]], formats: list[Format]) -> torch.Tensor:
    return torch.tensor([[f.bits_per_weight(s) for f in formats] for s in shapes], dtype=torch.float64)


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)``: the summed squared output error over calibration tokens (× 2/n)."""
    d = (w.float() - w_hat.float())
    return float(((d @ H.float()) * d).sum())


def _errors_for(w: torch.Tensor, formats: list[Format], err_fn) -> list[float]:
    shape = tuple(w.shape)
    return [err_fn(f.quantize(w).dequantize()) if f.fits(shape) else float("inf") for f in formats]


@torch.no_grad()
def _outside_stats(model: nn.Module, calib_ids: torch.Tensor, batch_size: int, device: torch.device,
                   want_head: bool, want_embed: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """lm_head input ``H`` and embedding token frequencies (× 2/n) from one full calibration forward."""
    from macq.quantizers.hessian import HessianAccumulator

    spec = arch_spec(model)
    head = model.get_submodule(spec.lm_head)
    acc = HessianAccumulator(head.in_features, device) if want_head else None
    handle = head.register_forward_pre_hook(lambda _m, a: acc.add(a[0].reshape(-1, a[0].shape[-1]))) if acc else None
    try:
        if acc is not None:
            for s in range(0, calib_ids.shape[0], batch_size):
                model(input_ids=calib_ids[s:s + batch_size].to(device), use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    freq = None
    if want_embed:
        vocab = model.get_submodule(spec.embed).num_embeddings
        freq = torch.bincount(calib_ids.reshape(-1).cpu(), minlength=vocab).double() * (2.0 / calib_ids.numel())
    return (acc.H if acc is not None else None), freq


@torch.no_grad()
def proxy_sensitivity(model: nn.Module, calib_ids: torch.Tensor, formats: list[Format],
                      modules: dict[str, nn.Module], batch_size: int = 8, device: str | torch.device = "cpu",
                      progress: bool = False) -> SensitivityTable:
    """Hessian-weighted error of every module in ``modules`` at every format (weights left untouched)."""
    from macq.quantizers.calibration import layerwise

    device = torch.device(device)
    spec = arch_spec(model)
    names = list(modules)
    errs: dict[str, list[float]] = {}
    layerwise(model, calib_ids, proxy_layer_step(spec, set(modules), formats, device, errs), batch_size=batch_size,
              device=device, progress=progress, description="sensitivity (proxy)")
    outside = [n for n in names if n not in errs]
    if outside:
        tied = tied_embeddings(model)
        unknown = [n for n in outside if n not in (spec.embed, spec.lm_head)]
        if unknown:
            raise MacqError(f"proxy sensitivity: {unknown[0]} is neither a decoder linear nor embedding/lm_head")
        want_head = spec.lm_head in outside or (tied and spec.embed in outside)
        H, freq = _outside_stats(model, calib_ids, batch_size, device, want_head, spec.embed in outside)
        for n in outside:
            w = get_weight(modules[n]).detach().float()
            if n == spec.lm_head:
                errs[n] = _errors_for(w, formats, lambda wh: hessian_error(w, wh, H))
            else:  # embedding [vocab, hidden]: one-hot inputs, so H is diagonal over rows
                def emb_err(wh: torch.Tensor) -> float:
                    e = float(((w - wh).pow(2).sum(1).double() * freq).sum())
                    return e + (hessian_error(w, wh, H) if tied else 0.0)
                errs[n] = _errors_for(w, formats, emb_err)
    return proxy_table(modules, formats, errs)


def proxy_layer_step(spec: Any, modules: set[str], formats: list[Format], device: torch.device,
                     errs: dict[str, list[float]]):
    """The per-layer step of :func:`proxy_sensitivity` (weights left untouched), shared with the streaming
    engine's first pass: ``errs[module]`` gets each format's Hessian-weighted error."""
    from macq.quantizers.hessian import collect_hessians

    def per_layer(_i: int, path: str, layer: nn.Module, inputs) -> None:
        groups = [[n for n in grp if f"{path}.{n}" in modules] for grp in spec.sequence]
        groups = [g for g in groups if g]
        if not groups:
            return
        with stage("hessian"):
            hs = collect_hessians(layer, inputs, [g[0] for g in groups], device)
        with stage("sensitivity"):
            for grp in groups:
                H = hs[grp[0]]
                for n in grp:
                    w = get_weight(layer.get_submodule(n)).detach().float()
                    errs[f"{path}.{n}"] = _errors_for(w, formats, lambda wh: hessian_error(w, wh, H))

    return per_layer


def proxy_table(modules: dict[str, nn.Module], formats: list[Format], errs: dict[str, list[float]],
                kind: str = "proxy") -> SensitivityTable:
    """The sensitivity table of ``errs`` (module -> error per format), costs from the modules' shapes."""
    names = list(modules)
    shapes = [tuple(get_weight(modules[n]).shape) for n in names]
    return SensitivityTable(names, {n: [n] for n in names}, list(formats),
                            torch.tensor([errs[n] for n in names], dtype=torch.float64),
                            _cost_table(shapes, formats), [s[0] * s[1] for s in shapes], kind)


def _fisher_errors(w: torch.Tensor, f: torch.Tensor, formats: list[Format]) -> list[float]:
    """``½·Σ F ⊙ (W − Ŵ)²`` for each format."""
    return _errors_for(w, formats, lambda wh: 0.5 * float((f * (w - wh).pow(2)).sum()))


def fisher_layer_step(modules: set[str], formats: list[Format], fisher: Any, errs: dict[str, list[float]]):
    """The per-layer step of :func:`fisher_sensitivity` over a layer-streamed Fisher diagonal (``fisher.pop``):
    ``errs[module]`` gets each format's ``½·Σ F ⊙ (W − Ŵ)²``."""
    def per_layer(_i: int, path: str, layer: nn.Module, _inputs) -> None:
        with stage("sensitivity"):
            for full in sorted(m for m in modules if m.startswith(path + ".")):
                w = get_weight(layer.get_submodule(full[len(path) + 1:])).detach().float()
                errs[full] = _fisher_errors(w, fisher.pop(full).to(w.device), formats)

    return per_layer


def fisher_sensitivity(model: nn.Module, calib_ids: torch.Tensor, formats: list[Format],
                       modules: dict[str, nn.Module], device: str | torch.device = "cpu",
                       progress: bool = False) -> SensitivityTable:
    """``½·Σ F ⊙ (W − Ŵ)²`` with ``F`` the empirical Fisher diagonal (mean over calibration sequences of the
    squared gradient of that sequence's mean next-token loss): a second-order estimate of the *model's*
    loss increase, in nats per token like the KL measure.

    Why besides the Hessian proxy: the proxy measures each layer's own output error and sums them as if a
    unit of error cost the same everywhere, which it does not (later layers, residual scale, what the head
    reads). Gradients carry the downstream sensitivity; one backward per calibration sequence is the cost.
    """
    fisher = fisher_diagonal(model, calib_ids, modules, device, progress)
    with torch.no_grad():
        errs = {n: _fisher_errors(get_weight(m).detach().float(), fisher[n], formats) for n, m in modules.items()}
    return proxy_table(modules, formats, errs, "fisher")


def fisher_diagonal(model: nn.Module, calib_ids: torch.Tensor, modules: dict[str, nn.Module],
                    device: str | torch.device = "cpu", progress: bool = False) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal ``[out, in]`` (Linear orientation) per module: the mean over calibration
    sequences of the squared gradient of each sequence's mean next-token loss. Also SqueezeLLM's per-weight
    sensitivity for weighted k-means (:mod:`macq.quantizers.kmeans_cal`)."""
    device = torch.device(device)
    weights = {n: m.weight for n, m in modules.items()}
    unique = list({id(w): w for w in weights.values()}.values())       # a tied embedding appears once
    was = [p.requires_grad for p in model.parameters()]
    fisher = {id(w): torch.zeros_like(w, dtype=torch.float32) for w in unique}
    try:
        model.requires_grad_(False)
        for w in unique:
            w.requires_grad_(True)
        for s in track(range(calib_ids.shape[0]), "sensitivity (fisher)", enabled=progress):
            x = calib_ids[s:s + 1].to(device)
            with torch.enable_grad():
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                grads = torch.autograd.grad(loss, unique)
            for w, g in zip(unique, grads):
                fisher[id(w)] += g.float().pow(2)
    finally:
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)
    n_seq = calib_ids.shape[0]
    out = {}
    for n, mod in modules.items():
        f = fisher[id(weights[n])] / n_seq
        out[n] = f.t() if is_conv1d(mod) else f                             # Fisher in [out, in] like W
    return out


@torch.no_grad()
def kl_sensitivity(model: nn.Module, calib_ids: torch.Tensor, formats: list[Format],
                   modules: dict[str, nn.Module], units: dict[str, list[str]] | None = None,
                   batch_size: int = 4, device: str | torch.device = "cpu", progress: bool = False) -> SensitivityTable:
    """Mean KL(p_fp || p_q) per calibration token when one unit alone is quantized at one format.

    Weights are restored after each measurement (the model is unchanged on return).
    """
    from macq.eval.agreement import token_stats

    device = torch.device(device)
    units = units or {n: [n] for n in modules}

    def logprobs() -> list[torch.Tensor]:
        out = []
        for s in range(0, calib_ids.shape[0], batch_size):
            logits = model(input_ids=calib_ids[s:s + batch_size].to(device), use_cache=False).logits
            out.append(torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1]))
        return out

    ref = logprobs()
    shapes = {n: tuple(get_weight(m).shape) for n, m in modules.items()}
    rows = []
    jobs = [(u, f) for u in units for f in formats]
    results: dict[tuple[str, Format], float] = {}
    for u, f in track(jobs, "sensitivity (KL)", enabled=progress):
        mods = units[u]
        if not all(f.fits(shapes[n]) for n in mods):
            results[u, f] = float("inf")
            continue
        saved = {n: get_weight(modules[n]).detach().clone() for n in mods}
        try:
            for n in mods:
                set_weight(modules[n], f.quantize(saved[n].float()).dequantize())
            kl = [token_stats(r, q)[0] for r, q in zip(ref, logprobs())]
            results[u, f] = float(torch.cat(kl).mean())
        finally:
            for n in mods:
                set_weight(modules[n], saved[n])
    for u in units:
        rows.append([results[u, f] for f in formats])
    bpw = []
    for u, mods in units.items():
        n = torch.tensor([shapes[m][0] * shapes[m][1] for m in mods], dtype=torch.float64)
        bpw.append((_cost_table([shapes[m] for m in mods], formats) * n[:, None]).sum(0) / n.sum())
    sizes = [sum(shapes[m][0] * shapes[m][1] for m in mods) for mods in units.values()]
    return SensitivityTable(list(units), {u: list(m) for u, m in units.items()}, list(formats),
                            torch.tensor(rows, dtype=torch.float64), torch.stack(bpw), sizes, "kl")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equal-length vectors (finite entries of both only; average ranks)."""
    a, b = a.flatten().double(), b.flatten().double()
    keep = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[keep], b[keep]
    if a.numel() < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged."""
    uniq, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    avg = first.double() + (counts.double() - 1) / 2
    return avg[inv]

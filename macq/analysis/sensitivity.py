"""Layer sensitivity: how much the model's output moves when one decoder layer, or one kind of linear
across all layers (q/k/v/o/gate/up/down), alone carries quantized weights.

The decoder-layer path and the module names come from the architecture registry
(:func:`macq.arch.arch_spec`), so "layer i" and "kind" mean the same thing for every supported model.
Results are ranked by KL (the output-distribution change per token); Δ perplexity is reported beside it.
The first/last-layer effect compares layer 0 and the last layer against the median layer.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn as nn

from macq.analysis.functional import LayerInputs, alone_effect
from macq.arch import arch_spec
from macq.eval.agreement import ReferenceLogprobs


def split_name(model: nn.Module, name: str) -> tuple[int | None, str]:
    """``(layer index, kind)`` of a module path, e.g. ``model.layers.3.self_attn.q_proj`` → ``(3, self_attn.q_proj)``;
    ``(None, name)`` outside the decoder layers."""
    prefix = arch_spec(model).layers + "."
    if not name.startswith(prefix):
        return None, name
    idx, _, kind = name[len(prefix):].partition(".")
    return (int(idx), kind) if idx.isdigit() else (None, name)


def sensitivity(model: nn.Module, weights: dict[str, torch.Tensor], ids: torch.Tensor, ref: ReferenceLogprobs,
                base: dict[str, float], by_layer: bool = True, by_kind: bool = True,
                layers: list[int] | None = None, cache: LayerInputs | None = None) -> dict[str, Any]:
    """Rows per decoder layer and per kind, each sorted by KL (largest first), plus the first/last summary."""
    groups_layer: dict[int, dict[str, torch.Tensor]] = {}
    groups_kind: dict[str, dict[str, torch.Tensor]] = {}
    for n, w in weights.items():
        i, kind = split_name(model, n)
        if i is None:
            continue
        groups_layer.setdefault(i, {})[n] = w
        groups_kind.setdefault(kind, {})[n] = w
    out: dict[str, Any] = {"by_layer": [], "by_kind": []}
    if by_layer:
        for i in sorted(groups_layer):
            if layers is not None and i not in layers:
                continue
            out["by_layer"].append({"layer": i, **alone_effect(model, groups_layer[i], ids, ref, base, start=i, cache=cache)})
    if by_kind:
        for kind in sorted(groups_kind):
            out["by_kind"].append({"kind": kind, "n_modules": len(groups_kind[kind]),
                                   **alone_effect(model, groups_kind[kind], ids, ref, base)})
    for key in ("by_layer", "by_kind"):
        ranked = sorted(out[key], key=lambda r: -r["kl"])
        for rank, r in enumerate(ranked, 1):
            r["rank"] = rank
    rows = out["by_layer"]
    if len(rows) >= 3:
        med = statistics.median(r["kl"] for r in rows)
        first, last = rows[0], rows[-1]
        out["first_last"] = {"first_layer": first["layer"], "first_kl": first["kl"], "first_rank": first["rank"],
                             "last_layer": last["layer"], "last_kl": last["kl"], "last_rank": last["rank"],
                             "median_kl": med, "first_over_median": first["kl"] / med if med > 0 else None,
                             "last_over_median": last["kl"] / med if med > 0 else None, "n_layers": len(rows)}
    return out

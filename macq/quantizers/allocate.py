"""Choosing one format per layer under a bits-per-weight budget: a multiple-choice knapsack, solved by DP.

Item ``i`` (a layer, ``n_i`` weights) takes exactly one option ``j`` costing ``bpw[i, j] * n_i`` stored bits
and adding ``err[i, j]`` to an additive error; minimise the total error with
``sum_i bpw[i, c_i] * n_i <= target_bpw * sum_i n_i``.

Why DP and not only the Lagrangian / convex-hull greedy: the greedy is optimal only at hull vertices and
leaves budget unspent between them, whereas the target must be met to 0.01 bpw. The DP runs over each
item's *extra* cost above its cheapest option, in quanta of ``q`` bits. Real costs are integers (stored
bits) with a large common divisor, which is used as ``q`` when the table stays small: the DP is then
exact. Otherwise costs are rounded **up** to quanta of ``q``, so every DP-feasible allocation is truly
feasible (never over budget); at most one quantum per item is lost, and ``q`` is set from ``resolution``
so that this loss is at most ``resolution`` bpw. ``q`` depends on the costs only, not on the target, so a
larger budget only ever enlarges the feasible set: the total error is monotone in the budget.

Cost: ``O(N * J * K)`` with ``K = (target - floor) * sum(n) / q`` bins, vectorised over bins; about
``N * J`` tensor ops of ``K`` elements (210 layers x 18 formats x ~3e5 bins: a second or two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from macq.errors import MacqError

_INF = float("inf")


@dataclass
class Allocation:
    """The chosen option per item, and what it costs."""

    choice: list[int]        # option index per item (into the columns of the input tables)
    bpw: float               # achieved bits per weight over all items
    error: float             # total error of the choice
    target_bpw: float
    floor_bpw: float         # cheapest possible allocation
    ceiling_bpw: float       # the all-best-format allocation (lowest error per item)
    notes: list[str] = field(default_factory=list)


def _as_table(x: Sequence[Sequence[float]] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.dim() != 2 or t.numel() == 0:
        raise MacqError(f"allocate: {name} must be a non-empty [items, options] table, got shape {tuple(t.shape)}")
    return t


def allocate(errors: Sequence[Sequence[float]] | torch.Tensor, bpw: Sequence[Sequence[float]] | torch.Tensor,
             sizes: Sequence[int] | torch.Tensor, target_bpw: float, resolution: float = 0.005) -> Allocation:
    """Minimum-total-error choice of one option per item with average bpw ``<= target_bpw``.

    ``errors``/``bpw`` are ``[N, J]``; an option unavailable for an item has ``bpw = inf`` (or nan).
    ``sizes[i]`` is the item's weight count. Raises :class:`MacqError` when ``target_bpw`` is below the
    cheapest possible allocation (never falls back to something else silently). A target at or above
    the all-best allocation returns it, with a note.
    """
    err, bits = _as_table(errors, "errors"), _as_table(bpw, "bpw")
    n = torch.as_tensor(sizes, dtype=torch.float64)
    if err.shape != bits.shape or n.shape != (err.shape[0],):
        raise MacqError(f"allocate: errors {tuple(err.shape)}, bpw {tuple(bits.shape)} and sizes {tuple(n.shape)} disagree")
    if (n <= 0).any():
        raise MacqError("allocate: every item needs a positive size")
    if not resolution > 0:
        raise MacqError(f"allocate: resolution={resolution}: expected > 0")
    bits = torch.where(torch.isnan(bits) | torch.isnan(err), torch.full_like(bits, _INF), bits)
    ok = torch.isfinite(bits)
    if not ok.any(1).all():
        bad = int((~ok.any(1)).nonzero()[0])
        raise MacqError(f"allocate: item {bad} has no available option")
    err = torch.where(ok, err, torch.full_like(err, _INF))
    cost = bits * n[:, None]                                   # stored bits per option
    total_n = float(n.sum())

    cheapest = torch.where(ok, cost, torch.full_like(cost, _INF)).min(1)
    min_cost = cheapest.values
    floor_bpw = float(min_cost.sum()) / total_n
    # Best option per item: lowest error, ties to the cheaper one.
    best = torch.stack([_best_index(err[i], cost[i]) for i in range(err.shape[0])])
    best_cost = cost.gather(1, best[:, None])[:, 0]
    ceiling_bpw = float(best_cost.sum()) / total_n

    if target_bpw < floor_bpw - 1e-9:
        raise MacqError(f"target_bpw={target_bpw:g} is below the floor {floor_bpw:.4f} bpw of these formats "
                        "(the cheapest format for every layer); raise the target or add cheaper formats")
    if target_bpw >= ceiling_bpw:
        choice = best.tolist()
        return Allocation(choice, ceiling_bpw, float(err.gather(1, best[:, None]).sum()), target_bpw,
                          floor_bpw, ceiling_bpw,
                          [f"target {target_bpw:g} >= {ceiling_bpw:.4f} bpw: every layer gets its best format"])

    budget = target_bpw * total_n - float(min_cost.sum())      # extra bits above the all-cheapest choice
    span = (ceiling_bpw - floor_bpw) * total_n                 # largest budget ever needed: fixes q for all targets
    q = _quantum(cost - min_cost[:, None], ok, resolution * total_n / err.shape[0], span)
    k = int(math.floor(budget / q + 1e-9))
    extra = torch.ceil((cost - min_cost[:, None]) / q - 1e-9).clamp_min(0)   # quanta, rounded up
    choice = _dp(err, extra, ok, k)
    chosen_cost = float(cost.gather(1, torch.tensor(choice)[:, None]).sum())
    out = Allocation(choice, chosen_cost / total_n, float(err.gather(1, torch.tensor(choice)[:, None]).sum()),
                     target_bpw, floor_bpw, ceiling_bpw)
    if out.bpw < target_bpw - 0.01:
        out.notes.append(f"achieved {out.bpw:.4f} bpw, more than 0.01 below the target {target_bpw:g}: "
                         "these formats' costs leave no closer allocation that lowers the error")
    return out


def _quantum(extra: torch.Tensor, ok: torch.Tensor, q_max_loss: float, span: float,
             max_cells: int = 20_000_000) -> float:
    """Cost quantum in bits. Integer costs sharing a common divisor ``g`` (real layer shapes do) are
    quantized exactly by ``g`` when the DP table stays small; otherwise ``q = floor(q_max_loss)`` (at least
    1), whose upward rounding loses at most ``q`` bits per item. Depends on the costs only, never on the
    target, so the allocation stays monotone in the budget."""
    q = max(1.0, math.floor(q_max_loss))
    vals = extra[ok]
    ints = torch.round(vals)
    if not torch.allclose(vals, ints, rtol=0, atol=1e-6):
        return q
    g = 0
    for v in torch.unique(ints.long()).tolist():
        g = math.gcd(g, v)
    if g >= q or (g > 0 and span / g * extra.shape[0] <= max_cells):
        return float(g)
    return q


def _best_index(err_row: torch.Tensor, cost_row: torch.Tensor) -> torch.Tensor:
    lowest = err_row.min()
    cand = torch.where(err_row == lowest, cost_row, torch.full_like(cost_row, _INF))
    return cand.argmin()


def _dp(err: torch.Tensor, extra: torch.Tensor, ok: torch.Tensor, k: int) -> list[int]:
    """``f[c]``: least error of the items so far with total extra quanta ``<= c``; backtrack the argmins."""
    n_items, n_opt = err.shape
    f = torch.zeros(k + 1, dtype=torch.float64)
    arg = torch.empty(n_items, k + 1, dtype=torch.int16)
    inf = torch.full((k + 1,), _INF, dtype=torch.float64)
    for i in range(n_items):
        cand = inf.expand(n_opt, k + 1).clone()
        for j in range(n_opt):
            e = int(extra[i, j]) if ok[i, j] else k + 1
            if e <= k:
                cand[j, e:] = f[: k + 1 - e] + err[i, j]
        f, arg[i] = cand.min(0)
    choice = [0] * n_items
    c = k
    for i in range(n_items - 1, -1, -1):
        j = int(arg[i, c])
        choice[i] = j
        c -= int(extra[i, j])
    return choice


def allocation_bpw(choice: Sequence[int], bpw: Sequence[Sequence[float]] | torch.Tensor,
                   sizes: Sequence[int] | torch.Tensor) -> float:
    """Average bpw of a given choice (for checks and recipes)."""
    bits = _as_table(bpw, "bpw")
    n = torch.as_tensor(sizes, dtype=torch.float64)
    picked = bits.gather(1, torch.as_tensor(list(choice))[:, None])[:, 0]
    return float((picked * n).sum() / n.sum())

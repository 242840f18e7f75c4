"""The budget allocator: feasibility, optimality against brute force, refusal, monotonicity."""

from __future__ import annotations

import itertools

import pytest
import torch

from macq.errors import MacqError
from macq.quantizers.allocate import allocate, allocation_bpw


def _instance(n_items: int, seed: int, bit_levels=(2.5, 3.5, 4.5, 5.5, 6.5, 8.5), sizes=None):
    """Errors fall with bits (like real quantization error, ~4^-bits) with per-item sensitivity."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.tensor(bit_levels, dtype=torch.float64).repeat(n_items, 1)
    sens = torch.rand(n_items, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    noise = 1 + 0.3 * torch.rand(n_items, len(bit_levels), generator=g, dtype=torch.float64)
    err = sens * noise * 4.0 ** (-bits)
    if sizes is None:
        sizes = (torch.randint(1, 64, (n_items,), generator=g) * 1024).tolist()
    return err, bits, sizes


def _brute(err, bits, sizes, target):
    n = torch.tensor(sizes, dtype=torch.float64)
    best = (float("inf"), None)
    for combo in itertools.product(range(err.shape[1]), repeat=err.shape[0]):
        idx = torch.tensor(combo)[:, None]
        b = float((bits.gather(1, idx)[:, 0] * n).sum() / n.sum())
        if b <= target + 1e-12:
            e = float(err.gather(1, idx).sum())
            best = min(best, (e, combo), key=lambda t: t[0])
    return best


@pytest.mark.parametrize("seed", range(3))
def test_meets_target_from_below(seed):
    err, bits, sizes = _instance(60, seed)
    for target in (2.9, 3.3, 4.0, 4.71, 6.02):
        a = allocate(err, bits, sizes, target)
        assert a.bpw <= target + 1e-9
        assert a.bpw >= target - 0.01, (target, a.bpw)
        assert a.bpw == pytest.approx(allocation_bpw(a.choice, bits, sizes))
        assert not a.notes


@pytest.mark.parametrize("seed", range(5))
def test_optimal_vs_brute_force(seed):
    g = torch.Generator().manual_seed(100 + seed)
    levels = (2.0, 3.0, 4.5, 6.0)
    err, bits, _ = _instance(5, seed, bit_levels=levels)
    err = err * (1 + torch.rand(err.shape, generator=g, dtype=torch.float64))  # not just a scaled curve
    sizes = torch.randint(1, 9, (5,), generator=g).mul(2).tolist()              # integer costs: exact DP
    for target in (2.3, 3.0, 3.7, 4.4, 5.1):
        brute_err, _ = _brute(err, bits, sizes, target)
        a = allocate(err, bits, sizes, target)
        assert a.bpw <= target + 1e-12
        assert a.error == pytest.approx(brute_err, rel=1e-12)


def test_unavailable_options_are_never_chosen():
    err, bits, sizes = _instance(20, 3)
    bits[::2, -1] = float("inf")  # e.g. a group size that does not divide the layer
    a = allocate(err, bits, sizes, 9.0)
    assert all(c != bits.shape[1] - 1 for c in a.choice[::2])
    a = allocate(err, bits, sizes, 4.0)
    assert all(c != bits.shape[1] - 1 for c in a.choice[::2])


def test_refuses_below_floor_and_caps_above_max():
    err, bits, sizes = _instance(10, 1)
    with pytest.raises(MacqError, match="below the floor 2.5"):
        allocate(err, bits, sizes, 2.4)
    a = allocate(err, bits, sizes, 2.5)               # exactly the floor is reachable
    assert a.bpw == pytest.approx(2.5)
    top = allocate(err, bits, sizes, 12.0)
    assert top.choice == [bits.shape[1] - 1] * 10 and top.notes and "best format" in top.notes[0]


def test_monotone_in_budget():
    err, bits, sizes = _instance(12, 7)
    errors = [allocate(err, bits, sizes, t).error for t in torch.arange(2.5, 8.6, 0.13).tolist()]
    assert all(b <= a + 1e-15 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_bad_tables_are_refused():
    with pytest.raises(MacqError, match="disagree"):
        allocate([[1.0, 0.5]], [[2.0, 4.0]], [10, 10], 3.0)
    with pytest.raises(MacqError, match="no available option"):
        allocate([[1.0, 0.5]], [[float("inf"), float("nan")]], [10], 3.0)


def test_rounded_costs_stay_feasible_and_near_optimal():
    """Non-integer costs take the rounding path: never over budget, and at least as good as the exact
    optimum with ``resolution`` less budget (rounding loses at most one quantum per item)."""
    g = torch.Generator().manual_seed(5)
    levels = (2.13, 3.37, 4.61, 6.29)
    err, bits, _ = _instance(5, 11, bit_levels=levels)
    sizes = torch.randint(5000, 20000, (5,), generator=g).tolist()
    for target in (2.6, 3.3, 4.1, 5.0):
        a = allocate(err, bits, sizes, target, resolution=0.005)
        assert a.bpw <= target + 1e-12
        brute_err, _ = _brute(err, bits, sizes, target - 0.005)
        assert a.error <= brute_err * (1 + 1e-12)

"""Migration-aware rebalancing: within tolerance of the best balance, few weights moved."""

from __future__ import annotations

import pytest
import torch

from moekit.eplb import gpu_loads, rebalance_experts, rebalance_with_migration
from moekit.eplb.migration import align

SHAPE = (40, 8, 2, 8)  # 32 experts -> 40 replicas, 8 groups, 2 nodes, 8 GPUs


def loads(seed: int, layers: int = 3) -> torch.Tensor:
    """Heavy-tailed expert loads from ``seed`` alone: Pareto(1, 1.5) by its inverse CDF, times U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    pareto = (1.0 - torch.rand(layers, 32, generator=gen)).pow(-1 / 1.5)
    return pareto * torch.rand(layers, 32, generator=gen)


@pytest.mark.parametrize("seed", range(3))
def test_plan_is_valid_and_within_tolerance(seed):
    old, new = loads(seed), loads(seed + 50)
    current = rebalance_experts(old, *SHAPE)[0]
    for tolerance in (0.0, 0.1, 10.0):
        plan = rebalance_with_migration(current, new, *SHAPE, tolerance=tolerance)
        assert (plan.logcnt >= 1).all() and (plan.logcnt.sum(-1) == 40).all()
        for l in range(3):
            assert torch.equal(torch.bincount(plan.phy2log[l], minlength=32), plan.logcnt[l])
            valid = plan.log2phy[l][plan.log2phy[l] >= 0]
            assert sorted(valid.tolist()) == list(range(40))
        assert torch.equal(plan.moves, (plan.phy2log != current).sum(-1))
        assert torch.allclose(plan.max_load, gpu_loads(new, plan.phy2log, 8).max(-1).values)
        assert (plan.max_load <= plan.best_max_load * (1 + tolerance) + 1e-9).all()
        best = gpu_loads(new, rebalance_experts(new, *SHAPE)[0], 8).max(-1).values
        assert (plan.best_max_load <= best + 1e-9).all()
    # a huge tolerance keeps the current placement: nothing moves
    assert (rebalance_with_migration(current, new, *SHAPE, tolerance=10.0).moves == 0).all()


def test_unchanged_loads_move_nothing_and_alignment_keeps_loads():
    w = loads(9)
    current = rebalance_experts(w, *SHAPE)[0]
    plan = rebalance_with_migration(current, w, *SHAPE, tolerance=0.0)
    assert (plan.moves == 0).all()
    # relabelling a shuffled copy of a placement recovers it exactly, GPU loads only permuted
    perm = torch.tensor([1, 0])  # swap the two nodes, then GPUs within them
    shuffled = current.view(3, 2, 4, 5)[:, perm][:, :, torch.tensor([3, 1, 2, 0])].flip(-1).reshape(3, 40)
    aligned = align(shuffled, current, 2, 8)
    assert torch.equal(aligned, current)
    # the same replicas per GPU, summed in another order: equal up to rounding
    assert torch.allclose(gpu_loads(w, aligned, 8).sort(-1).values, gpu_loads(w, shuffled, 8).sort(-1).values,
                          rtol=1e-12, atol=0)


def test_migration_bad_arguments():
    w = loads(0)
    current = rebalance_experts(w, *SHAPE)[0]
    with pytest.raises(ValueError, match="current_phy2log must have shape"):
        rebalance_with_migration(current[:, :8], w, *SHAPE)
    with pytest.raises(ValueError, match="logical expert ids"):
        rebalance_with_migration(current + 32, w, *SHAPE)
    with pytest.raises(TypeError, match="integer torch.Tensor"):
        rebalance_with_migration(current.float(), w, *SHAPE)
    with pytest.raises(ValueError, match="tolerance must be"):
        rebalance_with_migration(current, w, *SHAPE, tolerance=-1)

"""Routing logical top-k ids to replicas, and the sliding-window load recorder."""

from __future__ import annotations

import pytest
import torch

from moekit.eplb import ExpertLoadRecorder, logical_to_physical, rebalance_experts, static_table


def placement(seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.distributions.Pareto(1.0, 1.3).sample((1, 32)) * torch.rand(1, 32, generator=gen)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 48, 4, 2, 8)
    return phy2log[0], log2phy[0], logcnt[0]


@pytest.mark.parametrize("seed", range(4))
def test_round_robin_valid_and_even(seed):
    phy2log, log2phy, logcnt = placement(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    ids = torch.randint(0, 32, (500, 6), generator=gen)
    ids[torch.rand(500, 6, generator=gen) < 0.05] = -1
    out = logical_to_physical(ids, log2phy, logcnt, mode="round_robin", offset=seed)
    kept = ids >= 0
    assert out.shape == ids.shape and out.dtype == torch.int64
    assert torch.equal(out[~kept], ids[~kept])
    assert torch.equal(phy2log[out[kept]], ids[kept])
    received = torch.bincount(out[kept], minlength=48)
    for e in range(32):
        per_replica = received[log2phy[e, : logcnt[e]]]
        assert per_replica.max() - per_replica.min() <= 1


@pytest.mark.parametrize("seed", range(4))
def test_static_prefers_own_rank_and_spreads_the_rest(seed):
    phy2log, log2phy, logcnt = placement(seed)
    table = static_table(log2phy, logcnt, 8)
    assert table.shape == (8, 32)
    rank_of = torch.arange(48) // 6
    for e in range(32):
        replicas = log2phy[e, : logcnt[e]]
        assert torch.equal(phy2log[table[:, e]], torch.full((8,), e))
        local_ranks = set(rank_of[replicas].tolist())
        for r in range(8):
            assert (rank_of[table[r, e]] == r) == (r in local_ranks)
        # each replica serves at most one more rank than any other
        users = torch.bincount(table[:, e], minlength=48)[replicas]
        assert users.max() - users.min() <= 1
    ids = torch.randint(0, 32, (64, 8), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = -1
    for r in range(8):
        out = logical_to_physical(ids, log2phy, logcnt, mode="static", rank=r, table=table)
        assert out[0, 0] == -1 and torch.equal(out[ids >= 0], table[r][ids[ids >= 0]])
    rebuilt = logical_to_physical(ids, log2phy, logcnt, mode="static", rank=5, num_ranks=8)
    assert torch.equal(rebuilt, logical_to_physical(ids, log2phy, logcnt, mode="static", rank=5, table=table))


def test_routing_bad_arguments():
    _, log2phy, logcnt = placement(0)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="mode must be"):
        logical_to_physical(ids, log2phy, logcnt, mode="random")
    with pytest.raises(ValueError, match="needs table or num_ranks"):
        logical_to_physical(ids, log2phy, logcnt, mode="static")
    with pytest.raises(ValueError, match="rank must be in"):
        logical_to_physical(ids, log2phy, logcnt, mode="static", rank=8, num_ranks=8)
    with pytest.raises(TypeError, match="topk_ids must be an integer"):
        logical_to_physical(ids.float(), log2phy, logcnt, mode="round_robin")


def test_recorder_window_and_cumulative_counters():
    rec = ExpertLoadRecorder(num_layers=2, num_experts=4, window=2)
    rec.record(torch.tensor([[1, 0, 2, 0], [0, 3, 0, 0]]))
    # one rank's two local physical experts, both replicas of expert 3 in layer 1
    rec.record_cumulative(torch.tensor([5, 7], dtype=torch.int32), layer=1, expert_ids=torch.tensor([3, 3]))
    assert rec.load().tolist() == [[1, 0, 2, 0], [0, 3, 0, 12]]
    rec.step()
    rec.record_cumulative(torch.tensor([6, 7], dtype=torch.int32), layer=1, expert_ids=torch.tensor([3, 3]))
    rec.record(torch.tensor([1.0, 1.0, 1.0, 1.0]), layer=0)
    assert rec.load().tolist() == [[2, 1, 3, 1], [0, 3, 0, 13]]
    rec.step()  # the first step leaves the window
    assert rec.load().tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
    rec.record_cumulative(torch.tensor([2, 9], dtype=torch.int32), layer=1, expert_ids=torch.tensor([3, 3]))
    assert rec.load()[1, 3] == 1 + 2 + 2  # a counter that went down (reset) counts its new value
    assert rec.steps == 2
    rec.reset()
    assert rec.load().sum() == 0 and rec.steps == 0
    with pytest.raises(ValueError, match="layer must be"):
        rec.record(torch.ones(4), layer=2)
    with pytest.raises(ValueError, match="expert_ids must lie"):
        rec.record(torch.ones(2), layer=0, expert_ids=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="window must be"):
        ExpertLoadRecorder(2, 4, 0)

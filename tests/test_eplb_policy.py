"""rebalance_experts: the contract, the published greedy reproduced exactly, refined never worse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.eplb import gpu_loads, imbalance, rebalance_experts
from moekit.eplb.packing import balanced_packing, refine_packing
from moekit.eplb.replication import replicate_experts


def random_config(gen: np.random.Generator) -> tuple[int, int, int, int, int]:
    """(experts, replicas, groups, nodes, gpus), valid for the hierarchical or the global policy."""
    nodes = int(gen.integers(1, 4))
    gpus = nodes * int(gen.integers(1, 5))
    groups = nodes * int(gen.integers(1, 4)) if gen.random() < 0.7 else nodes + 1
    experts = groups * int(gen.integers(1, 5)) * nodes
    extra = int(gen.integers(0, 3))
    replicas = gpus * (-(-experts // gpus) + extra)
    return experts, replicas, groups, nodes, gpus


def random_loads(gen: np.random.Generator, layers: int, experts: int) -> torch.Tensor:
    kind = gen.integers(0, 3)
    if kind == 0:  # small integers: many ties
        return torch.from_numpy(gen.integers(0, 4, (layers, experts)))
    if kind == 1:  # Zipf-like
        return torch.from_numpy(gen.zipf(1.3, (layers, experts)).clip(max=10_000).astype(np.float32))
    return torch.from_numpy(gen.random((layers, experts)) ** 3 * 100)


def check_contract(weight, phy2log, log2phy, logcnt, replicas, groups, nodes, gpus):
    layers, experts = weight.shape
    assert phy2log.shape == (layers, replicas) and phy2log.dtype == torch.int64
    assert logcnt.shape == (layers, experts) and logcnt.dtype == torch.int64
    assert log2phy.shape == (layers, experts, int(logcnt.max())) and log2phy.dtype == torch.int64
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == replicas).all()
    for l in range(layers):
        assert torch.equal(torch.bincount(phy2log[l], minlength=experts), logcnt[l])
        for e in range(experts):
            slots = log2phy[l, e]
            assert (slots[: logcnt[l, e]] >= 0).all() and (slots[logcnt[l, e]:] == -1).all()
            assert (phy2log[l, slots[: logcnt[l, e]]] == e).all()
        assert sorted(log2phy[l][log2phy[l] >= 0].tolist()) == list(range(replicas))
    if groups % nodes == 0:  # hierarchical: each group's replicas on one node
        node = torch.arange(replicas) // (replicas // nodes)
        group = phy2log // (experts // groups)
        for l in range(layers):
            for g in range(groups):
                assert node[group[l] == g].unique().numel() == 1


# --- a plain per-layer transcription of the published algorithm, to check the vectorised one -----

def ref_pack(weights: list, packs: int) -> tuple[list[int], list[int]]:
    n = len(weights)
    if n // packs == 1:
        return list(range(n)), [0] * n
    load, items = [np.float32(0)] * packs, [0] * packs
    pack, rank = [0] * n, [0] * n
    for i in sorted(range(n), key=lambda i: -weights[i]):
        p = min((p for p in range(packs) if items[p] < n // packs), key=lambda p: load[p])
        pack[i], rank[i] = p, items[p]
        load[p] = np.float32(load[p] + weights[i])
        items[p] += 1
    return pack, rank


def ref_layer(w: torch.Tensor, replicas: int, groups: int, nodes: int, gpus: int):
    if groups % nodes:
        groups, nodes = 1, 1
    experts = w.numel()
    size = experts // groups
    per_gpu = replicas // gpus
    w32 = w.float().numpy()
    group_pack, group_rank = ref_pack(list(w.float().view(groups, size).sum(-1).numpy()), nodes)
    phy2log, phyrank = [], []
    for node in range(nodes):
        node_groups = sorted((g for g in range(groups) if group_pack[g] == node), key=lambda g: group_rank[g])
        ids = [g * size + i for g in node_groups for i in range(size)]
        cnt, reps, ranks = [1] * len(ids), list(range(len(ids))), [0] * len(ids)
        for _ in range(replicas // nodes - len(ids)):
            e = max(range(len(ids)), key=lambda e: (np.float32(w32[ids[e]]) / np.float32(cnt[e]), -e))
            reps.append(e)
            ranks.append(cnt[e])
            cnt[e] += 1
        loads = [np.float32(w32[ids[e]]) / np.float32(cnt[e]) for e in reps]
        gpu, slot = ref_pack(loads, gpus // nodes)
        placed = [None] * len(reps)
        for i in range(len(reps)):
            placed[gpu[i] * per_gpu + slot[i]] = (ids[reps[i]], ranks[i])
        phy2log += [e for e, _ in placed]
        phyrank += [r for _, r in placed]
    return phy2log, phyrank


@pytest.mark.parametrize("seed", range(40))
def test_greedy_matches_published_algorithm(seed):
    gen = np.random.default_rng(seed)
    experts, replicas, groups, nodes, gpus = random_config(gen)
    weight = random_loads(gen, 2, experts)
    phy2log, log2phy, logcnt = rebalance_experts(weight, replicas, groups, nodes, gpus, mode="greedy")
    check_contract(weight, phy2log, log2phy, logcnt, replicas, groups, nodes, gpus)
    for l in range(weight.shape[0]):
        ref_phy2log, ref_rank = ref_layer(weight[l], replicas, groups, nodes, gpus)
        assert phy2log[l].tolist() == ref_phy2log
        assert [int(log2phy[l, e, r]) for e, r in zip(ref_phy2log, ref_rank)] == list(range(replicas))


def test_refined_never_worse_than_greedy_and_usually_better():
    gen = np.random.default_rng(1234)
    strictly_lower = skewed = 0
    for _ in range(150):
        experts, replicas, groups, nodes, gpus = random_config(gen)
        weight = random_loads(gen, 3, experts)
        refined = rebalance_experts(weight, replicas, groups, nodes, gpus)
        greedy = rebalance_experts(weight, replicas, groups, nodes, gpus, mode="greedy")
        check_contract(weight, *refined, replicas, groups, nodes, gpus)
        r_max = gpu_loads(weight, refined[0], gpus).max(-1).values
        g_max = gpu_loads(weight, greedy[0], gpus).max(-1).values
        assert (r_max <= g_max * (1 + 1e-12)).all()
        assert torch.equal(refined[2].sum(-1), greedy[2].sum(-1))
    # skewed inputs of realistic size: strictly lower on most
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        weight = (1.0 - torch.rand(4, 64, generator=g)).pow(-1 / 1.5) * 100  # Pareto(1, 1.5), inverse CDF
        weight = weight[:, torch.randperm(64, generator=g)]
        for shape in ((80, 8, 1, 8), (72, 8, 2, 8)):
            skewed += 1
            r = imbalance(weight, rebalance_experts(weight, *shape)[0], shape[-1]).mean()
            gr = imbalance(weight, rebalance_experts(weight, *shape, mode="greedy")[0], shape[-1]).mean()
            strictly_lower += bool(r < gr)
    assert strictly_lower > skewed // 2


def test_hand_computed_global_case():
    # 4 experts -> 6 replicas on 2 GPUs. Replication: 8 gets a 2nd copy (8/1 largest), then a tie
    # 8/2 == 4/1 goes to the lower index: counts [3, 1, 1, 1]; replica loads 8/3, 4, 2, 2, 8/3, 8/3.
    # Greedy packing (heaviest first, lightest pack with room): GPU0 = {4, 8/3, 2}, GPU1 = {8/3, 8/3, 2}.
    weight = torch.tensor([[8.0, 4.0, 2.0, 2.0]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, 6, 1, 1, 2, mode="greedy")
    assert phy2log.tolist() == [[1, 0, 3, 0, 0, 2]]
    assert log2phy.tolist() == [[[3, 4, 1], [0, -1, -1], [5, -1, -1], [2, -1, -1]]]
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    assert gpu_loads(weight, phy2log, 2)[0].tolist() == pytest.approx([8 + 2 / 3, 7 + 1 / 3])
    # swapping 8/3 (GPU0) with 2 (GPU1) gives 8 and 8: perfect balance
    refined = rebalance_experts(weight, 6, 1, 1, 2)
    assert gpu_loads(weight, refined[0], 2)[0].tolist() == pytest.approx([8.0, 8.0])


def test_hand_computed_packing_and_replication():
    pack, rank = balanced_packing(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0]] and rank.tolist() == [[0, 0, 1, 1]]
    phy2log, rank, logcnt = replicate_experts(torch.tensor([[6.0, 3.0, 1.0]]), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 0]] and rank.tolist() == [[0, 0, 0, 1, 2]]
    assert logcnt.tolist() == [[3, 1, 1]]
    # refine: {5, 3} = 8 vs {2, 2} = 4; swapping 3 and 2 gives 7 vs 5, the best two packs of two can do
    w = torch.tensor([[5.0, 3.0, 2.0, 2.0]])
    pack, rank = refine_packing(w, torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 0, 1]]), 2)
    loads = torch.zeros(1, 2, dtype=torch.float64).scatter_add_(1, pack, w.double())
    assert sorted(loads[0].tolist()) == [5.0, 7.0]
    assert sorted(rank[pack == 0].tolist()) == [0, 1] and sorted(rank[pack == 1].tolist()) == [0, 1]


def test_hierarchical_groups_stay_on_nodes_and_global_fallback():
    gen = np.random.default_rng(7)
    weight = random_loads(gen, 2, 32)
    phy2log, log2phy, logcnt = rebalance_experts(weight, 48, 4, 2, 8)
    check_contract(weight, phy2log, log2phy, logcnt, 48, 4, 2, 8)
    # 3 groups over 2 nodes: the global policy (one group, one node) applies
    for mode in ("greedy", "refined"):
        fallback = rebalance_experts(weight[:, :30], 48, 3, 2, 8, mode=mode)
        direct = rebalance_experts(weight[:, :30], 48, 1, 1, 8, mode=mode)
        for a, b in zip(fallback, direct):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["greedy", "refined"])
def test_edge_cases(mode):
    # one layer, E == R: every expert once, identity replication
    w = torch.tensor([[5, 1, 3, 2]])
    phy2log, log2phy, logcnt = rebalance_experts(w, 4, 1, 1, 2, mode=mode)
    assert sorted(phy2log[0].tolist()) == [0, 1, 2, 3] and (logcnt == 1).all() and log2phy.shape == (1, 4, 1)
    # all-zero loads: still a valid placement, perfectly "balanced"
    zeros = torch.zeros(3, 16)
    out = rebalance_experts(zeros, 24, 4, 2, 4, mode=mode)
    check_contract(zeros, *out, 24, 4, 2, 4)
    assert (imbalance(zeros, out[0], 4) == 1).all()
    # a single GPU holds everything; ties go to the lowest index
    ties = torch.ones(1, 6, dtype=torch.int32)
    phy2log, _, logcnt = rebalance_experts(ties, 9, 1, 1, 1, mode=mode)
    assert logcnt.tolist() == [[2, 2, 2, 1, 1, 1]]
    assert sorted(phy2log[0].tolist()) == [0, 0, 1, 1, 2, 2, 3, 4, 5]
    # any numeric dtype, result on weight's device, int64
    out = rebalance_experts(torch.arange(8, dtype=torch.float16).view(1, 8), 8, 2, 1, 2, mode=mode)
    assert all(t.dtype == torch.int64 for t in out)


def test_largest_sizes():
    gen = np.random.default_rng(3)
    weight = torch.from_numpy(gen.zipf(1.2, (61, 256)).clip(max=100_000))
    for shape in ((288, 8, 4, 32), (320, 8, 1, 8)):
        refined = rebalance_experts(weight, *shape)
        greedy = rebalance_experts(weight, *shape, mode="greedy")
        assert (refined[2].sum(-1) == shape[0]).all() and (refined[2] >= 1).all()
        assert (imbalance(weight, refined[0], shape[-1]) <= imbalance(weight, greedy[0], shape[-1]) + 1e-12).all()
        node = torch.arange(shape[0]) // (shape[0] // shape[2])
        group_node = torch.zeros(61, 8, dtype=torch.int64).scatter_reduce_(
            1, refined[0] // 32, node.expand(61, -1), "amax", include_self=False)
        assert (group_node.gather(1, refined[0] // 32) == node).all()


def test_bad_arguments():
    w = torch.rand(2, 16)
    with pytest.raises(ValueError, match="num_replicas .* multiple of num_gpus"):
        rebalance_experts(w, 18, 4, 2, 4)
    with pytest.raises(ValueError, match="num_gpus .* multiple of num_nodes"):
        rebalance_experts(w, 18, 4, 2, 3)
    with pytest.raises(ValueError, match="num_replicas .* >= the number of experts"):
        rebalance_experts(w, 12, 4, 2, 4)
    with pytest.raises(ValueError, match="multiple of num_groups"):
        rebalance_experts(torch.rand(2, 15), 16, 4, 1, 4)
    with pytest.raises(ValueError, match="weight must be a non-empty 2-D"):
        rebalance_experts(torch.rand(16), 16, 4, 2, 4)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-w, 16, 4, 2, 4)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        rebalance_experts(w.tolist(), 16, 4, 2, 4)
    with pytest.raises(TypeError, match="num_gpus must be an int"):
        rebalance_experts(w, 16, 4, 2, 4.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        rebalance_experts(w, 16, 4, 2, 4, mode="best")

"""Inputs every rank can rebuild for every other rank, and the results they must produce.

Each rank's inputs come from a seed and its rank alone, so any rank can compute what it should
receive without communicating. The expected results are written here with plain loops, apart from
the library's code, on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.fp8 import per_token_cast_to_fp8


@dataclass
class Scenario:
    """Sizes and routing of one test. ``tokens[r]`` is rank r's token count."""

    tokens: list[int]
    hidden: int = 256
    num_experts: int = 8
    topk: int = 3
    seed: int = 0
    route: str = "random"  # "random" (expert 1 never chosen), "rank0" (only rank 0's experts), "none" (all -1)
    empty: float = 0.2  # probability that a slot is -1

    @property
    def world(self) -> int:
        return len(self.tokens)

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.world


@dataclass
class RankInputs:
    x: torch.Tensor  # bf16 [N, H], rank-coded: value rank + 1, token index in the last two columns
    x_random: torch.Tensor  # bf16 [N, H] random
    topk_idx: torch.Tensor  # int64 [N, K]
    topk_weights: torch.Tensor  # float32 [N, K]


def spread(pattern: list[int], world: int) -> list[int]:
    """Per-rank token counts for ``world`` ranks: ``pattern`` repeated (GPU tests run on any number of GPUs)."""
    return [pattern[r % len(pattern)] for r in range(world)]


def rank_inputs(sc: Scenario, rank: int, device: torch.device) -> RankInputs:
    g = torch.Generator().manual_seed(sc.seed * 7919 + rank)
    n, k = sc.tokens[rank], sc.topk
    if sc.route == "rank0":
        pool = list(range(sc.experts_per_rank))
    elif sc.route == "random":
        pool = [e for e in range(sc.num_experts) if e != 1]
    else:
        pool = []
    rows = []
    for _ in range(n):
        if pool:
            pick = torch.randperm(len(pool), generator=g)[:k]
            rows.append(torch.tensor([pool[i] for i in pick], dtype=torch.int64))
        else:
            rows.append(torch.full((k,), -1, dtype=torch.int64))
    idx = torch.stack(rows) if rows else torch.empty((0, k), dtype=torch.int64)
    idx[torch.rand(n, k, generator=g) < sc.empty] = -1
    weights = torch.rand(n, k, generator=g)
    x = torch.full((n, sc.hidden), float(rank + 1))
    token = torch.arange(n)
    x[:, -2] = (token // 256).float()
    x[:, -1] = (token % 256).float()
    x_random = torch.randn(n, sc.hidden, generator=g)
    return RankInputs(x.bfloat16().to(device), x_random.bfloat16().to(device), idx.to(device), weights.to(device))


def all_inputs(sc: Scenario, device: torch.device) -> list[RankInputs]:
    return [rank_inputs(sc, r, device) for r in range(sc.world)]


def owner(expert: int, sc: Scenario) -> int:
    return expert // sc.experts_per_rank


def expected_receive(sc: Scenario, inputs: list[RankInputs], me: int) -> list[tuple[int, int]]:
    """(source rank, token) of every row rank ``me`` receives in dispatch, in the promised order."""
    rows = []
    for s, inp in enumerate(inputs):
        for t in range(sc.tokens[s]):
            if any(e >= 0 and owner(e, sc) == me for e in inp.topk_idx[t].tolist()):
                rows.append((s, t))
    return rows


def count_matrix(sc: Scenario, inputs: list[RankInputs]) -> torch.Tensor:
    """int64 [R, R]: tokens rank i sends to rank j."""
    counts = torch.zeros(sc.world, sc.world, dtype=torch.int64)
    for s, inp in enumerate(inputs):
        for t in range(sc.tokens[s]):
            for r in {owner(e, sc) for e in inp.topk_idx[t].tolist() if e >= 0}:
                counts[s, r] += 1
    return counts


def local_ids(row: list[int], me: int, sc: Scenario) -> list[int]:
    lo = me * sc.experts_per_rank
    return [e - lo if e >= 0 and owner(e, sc) == me else -1 for e in row]


def expected_low_latency(sc: Scenario, inputs: list[RankInputs], me: int) -> list[list[tuple[int, int, int]]]:
    """Per local expert: (source rank, token, slot) of each received row, in the promised order."""
    slabs: list[list[tuple[int, int, int]]] = [[] for _ in range(sc.experts_per_rank)]
    for s, inp in enumerate(inputs):
        for t in range(sc.tokens[s]):
            for k, e in enumerate(inp.topk_idx[t].tolist()):
                if e >= 0 and owner(e, sc) == me:
                    slabs[e - me * sc.experts_per_rank].append((s, t, k))
    return slabs


def fp8_pair(x: torch.Tensor, column_major: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 form of x, its scales column-major as grouped GEMMs keep them."""
    data, scales = per_token_cast_to_fp8(x)
    if column_major:
        scales = scales.t().contiguous().t()
    return data, scales


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out)
    return out

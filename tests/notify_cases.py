"""Rank-side runs of the count exchange (one launch per dispatch) on the simulated heap."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.ep.heap import HeapLayout, SymmetricHeap
from moekit.ep.kernels.notify import exchange_counts
from moekit.ep.kernels.sync import ErrorRecord, wait_budget


def check_exchange(num_tokens: list[int], num_experts: int, topk: int, rounds: int) -> list[dict]:
    """Exchanges fresh random counts ``rounds`` times (a summary on even rounds only); returns per round
    what this rank announced and checked locally, and what the launch gave back."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cpu")
    layout = HeapLayout()
    table_off = layout.add("table", (world, world + 1 + num_experts), torch.int64)
    flags_off = layout.add("flags", (world,), torch.int64)
    heap = SymmetricHeap(dist.group.WORLD, layout.size, dev)
    errors = ErrorRecord(dev)
    epoch = torch.zeros(1, dtype=torch.int64)
    dummy = torch.zeros(16, dtype=torch.int64)
    n, e_loc = num_tokens[rank], num_experts // world
    results = []
    for r in range(rounds):
        g = torch.Generator().manual_seed(100 * r + rank)
        per_rank = torch.randint(0, 50, (world,), generator=g, dtype=torch.int32)
        per_expert = torch.randint(0, 50, (num_experts,), generator=g, dtype=torch.int32) if num_experts else None
        in_rank = (torch.rand(n, world, generator=g) < 0.5).to(torch.uint8)
        topk_idx = torch.randint(-1, max(num_experts, 4), (n, topk), generator=g)
        summarize = r % 2 == 0
        prefix, summary = exchange_counts(
            num_tokens_per_rank=per_rank, num_tokens=n, num_tokens_per_expert=per_expert, in_rank=in_rank,
            topk_idx=topk_idx, experts_per_rank=e_loc if summarize else 0, summarize=summarize,
            heap_ptrs=heap.ptrs, table_off=table_off, flags_off=flags_off, epoch=epoch, rank=rank,
            max_wait=wait_budget(10.0, True), error_addr=errors.address, interpret=True, dummy=dummy)
        errors.check(10.0)
        results.append(dict(
            row=per_rank.tolist() + [n] + (per_expert.tolist() if per_expert is not None else []),
            sent=in_rank.sum(dim=0).tolist(), range=[int(topk_idx.min()), int(topk_idx.max())] if n else [],
            prefix=prefix.tolist(), summary=summary.tolist() if summary is not None else None,
            epoch=int(epoch.item())))
        heap.barrier()  # every rank has read its table before the next round overwrites it
    return results

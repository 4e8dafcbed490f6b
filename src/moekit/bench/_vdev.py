"""torch's ``all_to_all_vdev_2d`` (NVSHMEM) as a dispatch / combine baseline, where it runs.

It moves the same rows as the NCCL baseline: one row per (token, destination rank) pair of the
benchmarks' routing, grouped by destination (one split per rank; torch's kernel refuses the 256
per-expert splits of DeepSeek's routing). It needs torch's NVSHMEM symmetric-memory backend, which
is chosen once per process, so it runs in worker processes of its own, apart from moekit's heap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.bench._nvlink import random_routing
from moekit.bench.timing import back_to_back_us


def heap_bytes(max_tokens: int, world: int, row_bytes: int) -> int:
    """NVSHMEM heap one rank needs: its rows plus the worst case it can receive, with slack."""
    return (max_tokens * world * 2 * row_bytes) * 5 // 4 + (64 << 20)


def measure(num_tokens: int, hidden: int, topk: int, num_experts: int, row_bytes_list: list[int]) -> list[dict]:
    """On each rank: microseconds per call (back to back) of ``all_to_all_vdev_2d`` for rows of each width in
    ``row_bytes_list`` on the benchmarks' routing, or the reason it cannot run."""
    import torch.distributed._symmetric_memory as symm_mem

    device = torch.device("cuda", torch.cuda.current_device())
    world, group_name = dist.get_world_size(), dist.group.WORLD.group_name
    _, idx, _ = random_routing(num_tokens, hidden, topk, num_experts, seed=dist.get_rank())
    in_rank = torch.zeros(num_tokens, world, dtype=torch.int64, device=device)
    in_rank.scatter_(1, idx // (num_experts // world), 1)
    rows = []
    try:
        symm_mem.set_backend("NVSHMEM")
        splits = symm_mem.empty(world, dtype=torch.int64, device=device)
        splits.copy_(in_rank.sum(0))
        splits_offsets = symm_mem.empty((2, world), dtype=torch.int64, device=device)
        for row_bytes in row_bytes_list:
            # bf16 elements as the carrier (every row width here is even); symmetric allocations
            # have one size on every rank: the most rows a rank can send or receive.
            inp = symm_mem.empty((num_tokens * world, row_bytes // 2), dtype=torch.bfloat16, device=device)
            out = symm_mem.empty((num_tokens * world, row_bytes // 2), dtype=torch.bfloat16, device=device)
            inp.normal_()

            def exchange(inp=inp, out=out):
                torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, splits, splits_offsets, group_name)

            us = back_to_back_us(exchange, before=dist.barrier)
            rows.append({"tokens": num_tokens, "row_bytes": row_bytes, "vdev_us": us})
            del inp, out
    except Exception as exc:  # noqa: BLE001 - a baseline that does not run here is reported, not fatal
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
        rows = [{"tokens": num_tokens, "row_bytes": b, "vdev_us": None, "vdev_error": reason} for b in row_bytes_list]
    return rows

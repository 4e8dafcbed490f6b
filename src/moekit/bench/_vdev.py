"""torch's ``all_to_all_vdev_2d`` (NVSHMEM) as a dispatch / combine baseline, where it runs.

It moves one row per (token, expert) pair, grouped by expert (the layout torchtitan's MoE uses),
so it crosses more bytes than a per-rank dispatch: the figure is its time on the same routing, not
on the same bytes. It needs torch's NVSHMEM symmetric-memory backend, which is chosen once per
process, so it runs in worker processes of its own, apart from moekit's heap.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.bench._nvlink import random_routing
from moekit.bench.timing import median_us


def heap_bytes(max_tokens: int, topk: int, world: int, row_bytes: int) -> int:
    """NVSHMEM heap one rank needs: its input pairs plus the worst case it can receive, with slack."""
    pairs = max_tokens * topk
    return (pairs * (1 + world) * row_bytes) * 5 // 4 + (64 << 20)


def measure(num_tokens: int, hidden: int, topk: int, num_experts: int, row_bytes_list: list[int]) -> list[dict]:
    """On each rank: median microseconds of ``all_to_all_vdev_2d`` for rows of each width in
    ``row_bytes_list`` on the benchmarks' routing, or the reason it cannot run."""
    import torch.distributed._symmetric_memory as symm_mem

    device = torch.device("cuda", torch.cuda.current_device())
    world, group_name = dist.get_world_size(), dist.group.WORLD.group_name
    _, idx, _ = random_routing(num_tokens, hidden, topk, num_experts, seed=dist.get_rank())
    rows = []
    try:
        symm_mem.set_backend("NVSHMEM")
        splits = symm_mem.empty(num_experts, dtype=torch.int64, device=device)
        splits.copy_(torch.bincount(idx.flatten(), minlength=num_experts))
        splits_offsets = symm_mem.empty((2, num_experts), dtype=torch.int64, device=device)
        pairs = num_tokens * topk
        for row_bytes in row_bytes_list:
            # bf16 elements as the carrier: every row width here is even.
            inp = symm_mem.empty((pairs, row_bytes // 2), dtype=torch.bfloat16, device=device)
            out = symm_mem.empty((pairs * world, row_bytes // 2), dtype=torch.bfloat16, device=device)
            inp.normal_()

            def exchange(inp=inp, out=out):
                torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, splits, splits_offsets, group_name)

            rows.append({"tokens": num_tokens, "row_bytes": row_bytes, "vdev_us": median_us(exchange, warmup=3, repeat=10,
                                                                      setup=dist.barrier)})
            del inp, out
    except Exception as exc:  # noqa: BLE001 - a baseline that does not run here is reported, not fatal
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
        rows = [{"tokens": num_tokens, "row_bytes": b, "vdev_us": None, "vdev_error": reason} for b in row_bytes_list]
    return rows

"""Flag round-trip latency between two ranks' GPUs with the kernels' own primitives (``signal`` /
``wait_geq`` at system scope): the part of a communication floor that no bandwidth hides."""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from moekit.ep.heap import SymmetricHeap
from moekit.ep.kernels.sync import ErrorRecord, error_pointer, op_code, peer_pointer, signal, wait_budget, wait_geq


# Rank 0 raises the peer's flag to base + i and waits for its own to reach it; rank 1 waits, then
# answers. One program each; iteration i is one round trip.
@triton.jit
def _flag_ping_pong(ptrs, rank, base, iters, max_wait, error_addr, op):
    peer = 1 - rank
    mine = peer_pointer(ptrs, rank, 0, tl.int64)
    theirs = peer_pointer(ptrs, peer, 0, tl.int64)
    error = error_pointer(error_addr)
    for i in range(iters):
        value = base + i + 1
        if rank == 0:
            signal(theirs, value)
        wait_geq(mine, value, max_wait, error, op, rank, peer, False)
        if rank == 1:
            signal(theirs, value)


def flag_round_trip_us(group: dist.ProcessGroup, device: torch.device, iters: int = 2000, repeat: int = 5) -> float:
    """Median microseconds of one flag round trip between ranks 0 and 1 of ``group`` (collective;
    CUDA only). Ranks other than 0 and 1 take no part but must call too."""
    heap = SymmetricHeap(group, 4096, device)
    rank = dist.get_rank(group)
    errors = ErrorRecord(device)
    times = []
    for r in range(repeat + 1):
        heap.barrier()
        if rank < 2:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _flag_ping_pong[(1,)](heap.ptrs, rank, r * iters, iters, wait_budget(10.0, False), errors.address,
                                  op_code("barrier"), num_warps=1)
            end.record()
            end.synchronize()
            if r:  # the first run compiles
                times.append(start.elapsed_time(end) * 1e3 / iters)
        errors.check(10.0)
    heap.barrier()
    times.sort()
    return times[len(times) // 2] if times else float("nan")

"""Flags between the GPUs of a benchmark's ranks, with the kernels' own primitives at system scope:
the flag round-trip latency (the part of a communication floor that no bandwidth hides) and a
device-side barrier that lines the GPUs up before a timed call."""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from moekit.ep.heap import SymmetricHeap, interpreting
from moekit.ep.kernels.sync import (ErrorRecord, error_pointer, op_code, peer_pointer, signal, signal_where,
                                   wait_all_geq, wait_budget, wait_geq)


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


# Rank r sets flags[r] = epoch in every rank's heap, then waits until its own flags[0..R) reached it.
@triton.jit
def _device_barrier(ptrs, rank, epoch, max_wait, error_addr, op, NUM_RANKS: tl.constexpr, BLOCK_R: tl.constexpr,
                    INTERPRET: tl.constexpr):
    peer = tl.arange(0, BLOCK_R)
    live = peer < NUM_RANKS
    theirs = (tl.load(ptrs + peer, mask=live, other=0) + rank * 8).to(tl.pointer_type(tl.int64))
    signal_where(theirs, tl.zeros([BLOCK_R], dtype=tl.int64) + epoch, live)
    mine = (tl.load(ptrs + rank) + peer * 8).to(tl.pointer_type(tl.int64))
    wait_all_geq(mine, live, epoch, peer, max_wait, error_pointer(error_addr), op, rank, INTERPRET)


class DeviceBarrier:
    """A barrier of ``group``'s GPUs, queued on the current stream (collective): no GPU goes past it
    before every GPU has reached it. The host does not wait. After a host barrier the GPUs leave it
    within about one flag latency of each other, so a call timed right after it starts on every
    rank at nearly the same moment. Under ``TRITON_INTERPRET=1`` it runs on the simulated heap (the
    host then waits). A rank that waits longer than ``timeout_s`` makes a later call (at once under
    the interpreter) raise ``TimeoutError`` naming it and the missing peer."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, timeout_s: float = 60.0) -> None:
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.heap = SymmetricHeap(group, 4096, device)
        self.errors = ErrorRecord(device)
        self.timeout_s = timeout_s
        self.epoch = 0

    def __call__(self) -> None:
        self.errors.check(self.timeout_s)
        self.epoch += 1
        interpret = interpreting()
        _device_barrier[(1,)](self.heap.ptrs, self.rank, self.epoch, wait_budget(self.timeout_s, interpret),
                              self.errors.address, op_code("barrier"), NUM_RANKS=self.world,
                              BLOCK_R=triton.next_power_of_2(self.world), INTERPRET=interpret, num_warps=1)
        self.errors.check(self.timeout_s)

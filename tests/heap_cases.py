"""Rank-side checks of the symmetric heap and the flag primitives every EP kernel builds on."""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from moekit.ep.heap import HeapLayout, SymmetricHeap, interpreting
from moekit.ep.kernels.sync import ErrorRecord, error_pointer, op_code, peer_pointer, signal, wait_budget, wait_geq


# Each rank stores rank * 1000 + i into slot i of its right neighbour's data region, signals the
# epoch on its flag word there, then waits for its left neighbour's flag and reads what arrived.
@triton.jit
def ring_exchange_kernel(ptrs, rank, world, epoch, data_offset, flag_offset, error_addr, max_wait, op,
                         N: tl.constexpr, INTERPRET: tl.constexpr):
    right = (rank + 1) % world
    left = (rank + world - 1) % world
    offs = tl.arange(0, N)
    tl.store(peer_pointer(ptrs, right, data_offset, tl.float32) + offs, (rank * 1000 + offs).to(tl.float32))
    signal(peer_pointer(ptrs, right, flag_offset + rank * 8, tl.int64), epoch)
    wait_geq(peer_pointer(ptrs, rank, flag_offset + left * 8, tl.int64), epoch, max_wait, error_pointer(error_addr),
             op, rank, left, INTERPRET)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def check_ring_exchange(rounds: int = 3, silent_rank: int = -1, timeout_s: float = 2.0) -> list:
    """Returns the data each round delivered, or the TimeoutError text where a wait gave up."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device()
    layout = HeapLayout()
    data_offset = layout.add("data", (16,), torch.float32)
    flag_offset = layout.add("flags", (world,), torch.int64)
    heap = SymmetricHeap(dist.group.WORLD, layout.size, dev)
    views = layout.views(heap)
    errors = ErrorRecord(dev)
    seen = []
    for epoch in range(1, rounds + 1):
        if rank == silent_rank and epoch == rounds:
            seen.append("silent")
            continue
        ring_exchange_kernel[(1,)](heap.ptrs, rank, world, epoch, data_offset, flag_offset, errors.address,
                                   wait_budget(timeout_s, interpreting()), op_code("barrier"), N=16,
                                   INTERPRET=interpreting())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        try:
            errors.check(timeout_s)
            seen.append(views["data"].cpu().tolist())
        except TimeoutError as exc:
            seen.append(str(exc))
    heap.barrier()
    return seen


def check_peer_views() -> list:
    """Each rank copies its rank-coded bytes into its right neighbour's heap through ``peers``; returns
    what landed in its own heap, and that ``peers`` has one full-size view per rank."""
    rank, world, dev = dist.get_rank(), dist.get_world_size(), _device()
    heap = SymmetricHeap(dist.group.WORLD, 256, dev)
    assert len(heap.peers) == world and all(p.numel() == 256 and p.dtype == torch.uint8 for p in heap.peers)
    assert heap.peers[rank].data_ptr() == heap.local.data_ptr()
    heap.peers[(rank + 1) % world][64:96].copy_(torch.full((32,), rank + 1, dtype=torch.uint8, device=dev))
    heap.barrier()
    return heap.local.cpu().tolist()

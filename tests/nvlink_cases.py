"""Rank-side runs of the NVLink store benchmark's kernel on the heap (simulated under the interpreter)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.bench import nvlink
from moekit.ep.heap import SymmetricHeap

ROWS, WORDS = 10, 12


def source_rows(rank: int) -> torch.Tensor:
    """What rank ``rank`` pushes: int32 [ROWS, WORDS], distinct per rank."""
    return (torch.arange(ROWS * WORDS, dtype=torch.int32) + rank * 10000).view(ROWS, WORDS)


def row_order() -> torch.Tensor:
    """The destination rows of the scattered pattern, the same on every rank."""
    return torch.randperm(ROWS, generator=torch.Generator().manual_seed(7)).to(torch.int32)


def check_push_rows(programs: int, flag_every: int, scatter: bool, tile_words: int) -> tuple[list, list]:
    """Pushes this rank's rows into the next rank's heap; returns (the rows that landed here, this
    heap's flag words)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    data_bytes = ROWS * WORDS * 4
    heap = SymmetricHeap(dist.group.WORLD, data_bytes + 8 * programs, torch.device("cpu"))
    peer_base = int(heap.ptrs[(rank + 1) % world].item())
    nvlink.push_rows(source_rows(rank), peer_base, row_order(), peer_base + data_bytes, programs, flag_every,
                     scatter, tile_words)
    heap.barrier()
    landed = heap.local[:data_bytes].view(torch.int32).view(ROWS, WORDS).clone()
    flags = heap.local[data_bytes:].view(torch.int64).tolist()
    heap.barrier()
    return landed.tolist(), flags

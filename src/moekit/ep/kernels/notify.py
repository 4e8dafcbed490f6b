"""Count exchange before a high-throughput dispatch: every rank learns the full [R, W] table.

Row s of the table is what rank s announced: how many rows it sends to each rank, how many tokens it
holds, then (when they fit) how many of its tokens chose each expert. Each rank writes its own row
into slot s of every peer's table (one writer per slot), raises its flag there, and waits for every
peer's flag.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.sync import (
    error_pointer,
    op_code,
    peer_pointer,
    signal,
    wait_all_geq,
)

OP_NOTIFY = tl.constexpr(op_code("notify"))


# table[rank, :width] on every peer  <-  row;   then   out[s, c] = table[s, c] once flag[s] >= epoch for all s
@triton.jit
def notify_kernel(row_ptr, width, heap_ptrs, table_off, flags_off, out_ptr, epoch_ptr, rank, max_wait, error_addr,
                  NUM_RANKS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + 1
    cols = tl.arange(0, BLOCK_C)
    row = tl.load(row_ptr + cols, mask=cols < width)
    for peer in tl.static_range(NUM_RANKS):
        slot = peer_pointer(heap_ptrs, peer, table_off + rank * width * 8, tl.int64)
        tl.store(slot + cols, row, mask=cols < width)
    tl.debug_barrier()
    for peer in tl.static_range(NUM_RANKS):
        signal(peer_pointer(heap_ptrs, peer, flags_off + rank * 8, tl.int64), epoch)
    ranks = tl.arange(0, BLOCK_R)
    present = ranks < NUM_RANKS
    flags = peer_pointer(heap_ptrs, rank, flags_off, tl.int64) + tl.where(present, ranks, 0)
    wait_all_geq(flags, present, epoch, ranks, max_wait, error_pointer(error_addr), OP_NOTIFY, rank,
                 INTERPRET)
    tl.debug_barrier()
    table = peer_pointer(heap_ptrs, rank, table_off, tl.int64)
    cells = ranks[:, None] * width + cols[None, :]
    inside = present[:, None] & (cols[None, :] < width)
    tl.store(out_ptr + cells, tl.load(table + cells, mask=inside), mask=inside)


def notify(row: torch.Tensor, heap_ptrs: torch.Tensor, table_off: int, flags_off: int, epoch: torch.Tensor,
           rank: int, max_wait: int, error_addr: int, interpret: bool) -> torch.Tensor:
    """Exchanges ``row`` (int64 [W], the same W on every rank) with every rank; returns the int64
    [R, W] table of all rows. The heap's table holds at least R * W words.

    ``epoch`` (int64 [1], on the device) is the number of exchanges done so far; the caller adds 1
    after this launch. The flag words live at ``flags_off``, the table at ``table_off``.
    """
    num_ranks = heap_ptrs.numel()
    width = row.numel()
    out = torch.empty(num_ranks, width, dtype=torch.int64, device=row.device)
    notify_kernel[(1,)](row, width, heap_ptrs, table_off, flags_off, out, epoch, rank, max_wait, error_addr,
                        NUM_RANKS=num_ranks, BLOCK_C=next_pow2(width),
                        BLOCK_R=next_pow2(num_ranks), INTERPRET=interpret)
    return out

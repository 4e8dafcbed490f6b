"""Count exchange before a high-throughput dispatch: every rank learns the full [R, W] table.

Row s of the table is what rank s announced: how many rows it sends to each rank, how many tokens it
holds, then (when they fit) how many of its tokens chose each expert. Each rank writes its own row
into slot s of every peer's table (one writer per slot), raises its flag there, and waits for every
peer's flag. The same one-program launch then derives what the dispatch needs from the table (the
rank prefix matrix) and, for the host's single read, a summary with this rank's checks: every piece
a separate torch op would cost the host several microseconds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.dispatch import tokens_per_rank
from moekit.ep.kernels.sync import error_pointer, op_code, peer_pointer, signal, wait_all_geq

OP_NOTIFY = tl.constexpr(op_code("notify"))
# top-k slots one step of the range check reads.
_RANGE_BLOCK = tl.constexpr(4096)


# row = [per_rank[0..R), num_tokens, per_expert[0..W-R-1)] (int64) -> table[rank] on every rank; once every
# rank's flag reached epoch:
#   prefix[s, j] = sum over s' <= s of table[s', j]   (int32 [R, R])
#   with SUMMARY, summary (int64) = [table[s, c] for s < R, c <= R] ++ [#{t : in_rank[t, j]} for j < R]
#     ++ [sum over s of table[s, R + 1 + rank * E_loc + e] for e < E_loc] ++ (with CHECK_TOPK) [min, max of topk]
#   *epoch_ptr = epoch
@triton.jit(do_not_specialize=["num_tokens", "num_slots", "rank"])
def notify_kernel(per_rank_ptr, num_tokens, per_expert_ptr, width, in_rank_ptr, topk_ptr, num_slots, heap_ptrs,
                  table_off, flags_off, prefix_ptr, summary_ptr, epoch_ptr, rank, experts_per_rank, max_wait,
                  error_addr, NUM_RANKS: tl.constexpr, SUMMARY: tl.constexpr, CHECK_TOPK: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + 1
    cols = tl.arange(0, BLOCK_C)
    per_rank = tl.load(per_rank_ptr + cols, mask=cols < NUM_RANKS, other=0).to(tl.int64)
    per_expert = tl.load(per_expert_ptr + cols - NUM_RANKS - 1, mask=(cols > NUM_RANKS) & (cols < width),
                         other=0).to(tl.int64)
    row = tl.where(cols < NUM_RANKS, per_rank, tl.where(cols == NUM_RANKS, num_tokens.to(tl.int64), per_expert))
    for peer in tl.static_range(NUM_RANKS):
        slot = peer_pointer(heap_ptrs, peer, table_off + rank * width * 8, tl.int64)
        tl.store(slot + cols, row, mask=cols < width)
    tl.debug_barrier()
    for peer in tl.static_range(NUM_RANKS):
        signal(peer_pointer(heap_ptrs, peer, flags_off + rank * 8, tl.int64), epoch)
    ranks = tl.arange(0, BLOCK_R)
    present = ranks < NUM_RANKS
    if SUMMARY:
        # This rank's own checks, while the peers' rows are on their way.
        sent = tokens_per_rank(in_rank_ptr, num_tokens, NUM_RANKS, BLOCK_R)
        if CHECK_TOPK:
            offs = tl.arange(0, _RANGE_BLOCK)
            lo = tl.full([_RANGE_BLOCK], 1 << 62, tl.int64)
            hi = tl.full([_RANGE_BLOCK], -(1 << 62), tl.int64)
            for i in range(0, num_slots, _RANGE_BLOCK):
                m = i + offs < num_slots
                expert = tl.load(topk_ptr + i + offs, mask=m, other=0)
                lo = tl.minimum(lo, tl.where(m, expert, 1 << 62))
                hi = tl.maximum(hi, tl.where(m, expert, -(1 << 62)))
    flags = peer_pointer(heap_ptrs, rank, flags_off, tl.int64) + tl.where(present, ranks, 0)
    wait_all_geq(flags, present, epoch, ranks, max_wait, error_pointer(error_addr), OP_NOTIFY, rank, INTERPRET)
    tl.debug_barrier()
    table = peer_pointer(heap_ptrs, rank, table_off, tl.int64)
    square = present[:, None] & present[None, :]
    counts = tl.load(table + ranks[:, None] * width + ranks[None, :], mask=square, other=0)
    tl.store(prefix_ptr + ranks[:, None] * NUM_RANKS + ranks[None, :], tl.cumsum(counts, axis=0).to(tl.int32),
             mask=square)
    if SUMMARY:
        head = present[:, None] & (ranks[None, :] <= NUM_RANKS)
        wide = tl.load(table + ranks[:, None] * width + ranks[None, :], mask=head, other=0)
        tl.store(summary_ptr + ranks[:, None] * (NUM_RANKS + 1) + ranks[None, :], wide, mask=head)
        at = NUM_RANKS * (NUM_RANKS + 1)
        tl.store(summary_ptr + at + ranks, sent.to(tl.int64), mask=present)
        at += NUM_RANKS
        experts = tl.arange(0, BLOCK_E)
        mine = present[:, None] & (experts < experts_per_rank)[None, :]
        local = tl.load(table + ranks[:, None] * width + NUM_RANKS + 1 + rank * experts_per_rank + experts[None, :],
                        mask=mine, other=0)
        tl.store(summary_ptr + at + experts, tl.sum(local, axis=0), mask=experts < experts_per_rank)
        if CHECK_TOPK:
            at += experts_per_rank
            tl.store(summary_ptr + at, tl.min(lo, axis=0))
            tl.store(summary_ptr + at + 1, tl.max(hi, axis=0))
    tl.store(epoch_ptr, epoch)


def exchange_counts(*, num_tokens_per_rank: torch.Tensor, num_tokens: int, num_tokens_per_expert: torch.Tensor | None,
                    in_rank: torch.Tensor, topk_idx: torch.Tensor | None, experts_per_rank: int, summarize: bool,
                    heap_ptrs: torch.Tensor, table_off: int, flags_off: int, epoch: torch.Tensor, rank: int,
                    max_wait: int, error_addr: int, interpret: bool,
                    dummy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exchanges this rank's counts with every rank, in one launch; returns (prefix, summary).

    Args:
        num_tokens_per_rank: int32 [R]; num_tokens: this rank's tokens; num_tokens_per_expert: int32
            [E] or None (then the table's rows stop after the token count). Every rank passes the same
            kinds, so rows have the same width W everywhere; the heap's table holds R * W words.
        in_rank: uint8 [N, R], is_token_in_rank; topk_idx: int64 [N, K] or None (its range is checked).
        experts_per_rank: E_loc, whose received counts the summary carries (0: none).
        summarize: whether to build the summary (a caller that reads nothing from the host skips it).
        epoch: int64 [1] on the device, exchanges done so far; the launch raises it by one.

    Returns:
        prefix: int32 [R, R], the rank prefix matrix (entry [s, j]: rows ranks 0..s send rank j).
        summary: int64, or None without ``summarize``: the table's first R + 1 columns row by row,
            then this rank's tokens bound for each rank (is_token_in_rank.sum(0)), its received tokens
            per local expert, and the smallest and largest id in ``topk_idx`` when it is not empty.
    """
    num_ranks = heap_ptrs.numel()
    width = num_ranks + 1 + (num_tokens_per_expert.numel() if num_tokens_per_expert is not None else 0)
    check_topk = summarize and topk_idx is not None and topk_idx.numel() > 0
    prefix = torch.empty(num_ranks, num_ranks, dtype=torch.int32, device=heap_ptrs.device)
    summary = torch.empty(num_ranks * (num_ranks + 2) + experts_per_rank + 2 * check_topk, dtype=torch.int64,
                          device=heap_ptrs.device) if summarize else None
    notify_kernel[(1,)](num_tokens_per_rank, num_tokens,
                        num_tokens_per_expert if num_tokens_per_expert is not None else dummy, width,
                        in_rank if in_rank.numel() else dummy, topk_idx.contiguous() if check_topk else dummy,
                        topk_idx.numel() if check_topk else 0, heap_ptrs, table_off, flags_off, prefix,
                        summary if summarize else dummy, epoch, rank, experts_per_rank, max_wait, error_addr,
                        NUM_RANKS=num_ranks, SUMMARY=summarize, CHECK_TOPK=check_topk, BLOCK_C=next_pow2(width),
                        BLOCK_R=next_pow2(num_ranks + 1), BLOCK_E=next_pow2(max(experts_per_rank, 1)),
                        INTERPRET=interpret)
    return prefix, summary


class CountSummary(NamedTuple):
    """A summary of :func:`exchange_counts`, read on the host.

    Attributes:
        table: [R][R + 1], row s: the rows rank s sends each rank, then its token count.
        sent: this rank's tokens bound for each rank (is_token_in_rank.sum(0)).
        received_per_expert: this rank's received tokens per local expert.
        topk_range: (smallest, largest) id in ``topk_idx``, or None when it was empty or not given.
    """

    table: list[list[int]]
    sent: list[int]
    received_per_expert: list[int]
    topk_range: tuple[int, int] | None


def read_summary(summary: torch.Tensor, num_ranks: int, experts_per_rank: int) -> CountSummary:
    """Reads ``summary`` (one device read) and splits it into its parts."""
    values = summary.tolist()
    r, at = num_ranks, num_ranks * (num_ranks + 1)
    table = [values[s * (r + 1):(s + 1) * (r + 1)] for s in range(r)]
    received = values[at + r:at + r + experts_per_rank]
    checked = values[at + r + experts_per_rank:]
    return CountSummary(table, values[at:at + r], received, (checked[0], checked[1]) if checked else None)

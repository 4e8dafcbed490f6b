"""High-throughput combine through the copy engines: rows go back by copy-engine copies, every SM reduces.

The rows a rank returns to peer p are the block it received from p: contiguous in its input, in p's
token order. So one copy per (peer, chunk), issued straight to the driver (:mod:`moekit.ep.memcpy`),
moves them into p's heap region at slot ``(this rank's index among p's peers) * capacity + row``,
with no SM spent on the transfer (the kernel-driven combine gives a quarter of its SMs to sending,
and they cap it). Each chunk's copy is
followed, on the same stream, by an 8-byte copy of this call's epoch into ``arrived[rank, chunk]`` at
p: a stream runs its copies one after another, so the epoch lands after the rows.

On every rank a side stream first waits (one-program kernel) until the peers have read what the
previous call left in their regions (``consumed``), then issues the copies; meanwhile, on the calling
stream, every program of the SM budget reduces tokens in interleaved tiles, waiting for a peer's
chunk only when a token's row lies in it, and raises ``consumed`` when done. The two streams'
kernels wait on each other's progress across ranks, so both must be able to run at once (as they
do in eager mode and in CUDA-graph replays, whose branches run concurrently). Used when the dispatch
left the rank prefix matrix on the host (the copy sizes), one round holds every block and the rows
are many enough to repay the copies' host time (``MIN_BYTES``); otherwise the kernel-driven combine
(:mod:`moekit.ep.kernels.combine`) runs. Flags as in :mod:`moekit.ep.kernels.dispatch`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.combine import OP_COMBINE, reduce_tiles, sum_rows
from moekit.ep.kernels.dispatch import _FLAG_STRIDE, NUM_WARPS, flag_blocks, signal_peers, wait_peers
from moekit.ep.kernels.sync import error_pointer, wait_all
from moekit.ep.memcpy import copy_bytes

# Row copies per call over all peers: each copy and its epoch copy cost the copy engine a few
# microseconds, so more chunks start the reduce earlier but move the rows slower (2 x H200: 59 MB in
# 1 / 2 / 4 / 8 equal chunks took 167 / 175 / 189 / 210 us). A 4096-token combine (graph replays)
# took 283 / 297 / 266 / 246 us with 2 / 3 / 4 / 6 chunks; 4 keeps the host's copies fewer.
COPY_CHUNKS = 4


# Rows (bf16 bytes, of the rank that sent the most tokens) from which a combine goes through the
# copy engines. Its host time is above the kernel-driven combine's (the copies, a second launch, the
# stream fork), which smaller combines do not earn back: on 2 x H200 (hidden 7168) at 2048 tokens
# (29 MB) the copies cut device time 261 -> 147-149 us, but back-to-back calls took 540-563 us
# against 270 (copies through the driver, moekit.ep.memcpy); at 4096 tokens (59 MB) they win both
# ways (448 -> 249-259 us).
MIN_BYTES = 32 << 20


def chunks_per_peer(num_ranks: int) -> int:
    """Chunks each peer's rows are copied in: ``COPY_CHUNKS`` shared among the peers, at least one."""
    return max(1, COPY_CHUNKS // max(num_ranks - 1, 1))


# With C >= 2 chunks, chunk c < C - 1 of a block of n rows ends at row n * (1 + 3c) // (3C - 4), the
# last at n: the first and last chunks weigh 1, the others 3. The reduce can start once the first
# has landed, and after the last lands only its share is left to sum; the middle ones keep the
# copies few.
@triton.jit
def chunk_of(row, rows, CHUNKS: tl.constexpr):
    """The chunk (int32) that row ``row`` of a block of ``rows`` rows is copied in."""
    chunk = tl.zeros(row.shape, tl.int32)
    for c in tl.static_range(CHUNKS - 1):
        chunk += (row >= rows * (1 + 3 * c) // (3 * CHUNKS - 4)).to(tl.int32)
    return chunk


def chunk_rows(rows: int, chunks: int, c: int) -> tuple[int, int]:
    """Rows [lo, hi) of chunk c of a block of ``rows`` (the split :func:`chunk_of` assumes)."""
    def end(i: int) -> int:
        return rows if i == chunks - 1 else rows * (1 + 3 * i) // (3 * chunks - 4)
    return (end(c - 1) if c else 0), end(c)


# Once peers have raised consumed[s, q] >= epoch - 1 (every program q < prev_programs of the previous
# call): *value_ptr = epoch, this call's epoch, which the copies then carry to the peers.
@triton.jit(do_not_specialize=["prev_programs", "rank"])
def clear_to_copy_kernel(heap_ptrs, consumed_off, epoch_ptr, value_ptr, prev_programs, rank, max_wait, error_addr,
                         NUM_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                         INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + 1
    wait_peers(heap_ptrs, consumed_off, rank, prev_programs, epoch - 1, max_wait, error_addr, OP_COMBINE, NUM_RANKS,
               BLOCK_R, BLOCK_P, INTERPRET)
    tl.store(value_ptr, epoch)


# Program r of P, for the tiles of tokens r, r + P, ... (BLOCK_T each): with place[j, t] = #{t' <= t :
# in_rank[t', j]}, token t's row at rank j is row o = place[j, t] - 1 of the block this rank sent j
# (n_j = prefix[rank, j] - prefix[rank - 1, j] rows), copied back in chunk chunk_of(o, n_j). Once
# arrived[j, chunk] >= epoch:
#   out[t] = bf16(((0 + sum over j with in_rank[t, j] of f32(row_j)) + f32(bias0[t])) + f32(bias1[t]))
#   row_j = x[prefix[rank - 1, rank] + o] for j = rank, else region[(j - (j > rank)) * capacity + o]
#   out_weights[t] = the same sum of the weights
@triton.jit(do_not_specialize=["num_tokens", "capacity", "rank"])
def reduce_copied_kernel(x_ptr, weights_ptr, place_ptr, in_rank_ptr, prefix_ptr, bias0_ptr, bias1_ptr, out_ptr,
                         out_weights_ptr, num_tokens, hidden, num_topk, capacity, reg_data, reg_weights, heap_ptrs,
                         arrived_off, consumed_off, epoch_ptr, rank, max_wait, error_addr, NUM_RANKS: tl.constexpr,
                         CHUNKS: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + 1
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    ranks = tl.arange(0, BLOCK_R)
    real_rank = ranks < NUM_RANKS
    peer = real_rank & (ranks != rank)
    sent_lo = tl.load(prefix_ptr + (rank - 1) * NUM_RANKS + ranks, mask=real_rank & (rank > 0), other=0)
    sent = tl.load(prefix_ptr + rank * NUM_RANKS + ranks, mask=real_rank, other=0) - sent_lo
    own_lo = tl.load(prefix_ptr + (rank - 1) * NUM_RANKS + rank, mask=rank > 0, other=0).to(tl.int64)
    heap = tl.load(heap_ptrs + rank)
    arrived = (heap + arrived_off).to(tl.pointer_type(tl.int64)) + tl.where(peer, ranks, 0) * _FLAG_STRIDE
    slot_lo = ((ranks - (ranks > rank).to(tl.int32)) * capacity).to(tl.int64)
    row_bytes = hidden.to(tl.int64) * 2
    toks = tl.arange(0, BLOCK_T)
    known = tl.full([BLOCK_R], -1, tl.int32)  # the last chunk of each peer seen arrived
    for t0 in range(pid * BLOCK_T, num_tokens, programs * BLOCK_T):
        t = t0 + toks
        tm = t < num_tokens
        cell = t[:, None] * NUM_RANKS + ranks[None, :]
        tile_mask = tm[:, None] & real_rank[None, :]
        goes = tl.load(in_rank_ptr + cell, mask=tile_mask, other=0) != 0
        row = (tl.load(place_ptr + ranks[None, :] * num_tokens + t[:, None], mask=tile_mask, other=1) - 1).to(tl.int64)
        needed = tl.max(tl.where(goes & peer[None, :], chunk_of(row, sent[None, :], CHUNKS), -1), axis=0)
        if tl.max(needed - known, axis=0) > 0:
            ahead = needed > known
            wait_all(arrived + tl.where(ahead, needed, 0), ahead, epoch, ranks, max_wait, error_pointer(error_addr),
                     OP_COMBINE, rank, INTERPRET)
            known = tl.maximum(known, needed)
        own = ranks[None, :] == rank
        slot = slot_lo[None, :] + row
        rows = tl.where(own, x_ptr.to(tl.int64) + (own_lo + row) * row_bytes, heap + reg_data + slot * row_bytes)
        weight_rows = tl.where(own, weights_ptr.to(tl.int64) + (own_lo + row) * num_topk * 4,
                               heap + reg_weights + slot * num_topk * 4)
        sum_rows(rows, weight_rows, goes, t, tm, bias0_ptr, bias1_ptr, out_ptr, out_weights_ptr, hidden, num_topk,
                 NUM_RANKS, NUM_BIASES, HAS_WEIGHTS, BLOCK_T, BLOCK_H, BLOCK_K, BLOCK_R, ALIGN)
    signal_peers(heap_ptrs, consumed_off, rank, pid, epoch, NUM_RANKS)


def copy_back(*, x: torch.Tensor, topk_weights: torch.Tensor | None, prefix_host: tuple[tuple[int, ...], ...],
              peer_heaps: list[torch.Tensor], regions: dict, capacity: int, arrived_off: int, value: torch.Tensor,
              rank: int, stream: int | None) -> None:
    """Issues on ``stream`` (see :func:`~moekit.ep.memcpy.copy_bytes`) the copies of every returned row
    into its peer's region, each chunk followed by the copy of ``value`` (this call's epoch) into the
    peer's ``arrived`` flag.

    Args:
        x: bf16 [M, H], the rows to return (this rank's received rows, in dispatch order), contiguous.
        topk_weights: float32 [M, K] (contiguous) or None. prefix_host: the rank prefix matrix as host ints.
        peer_heaps: uint8 [heap bytes] of every rank, addressable from this rank.
        regions: byte offsets of the heap arrays ``data`` and ``weights``; ``capacity`` rows per peer.
        value: int64 [1] on this rank's device, written by :func:`clear_to_copy_kernel`.
    """
    num_ranks = len(peer_heaps)
    chunks = chunks_per_peer(num_ranks)
    row_bytes = x.shape[1] * 2
    weight_row = topk_weights.shape[1] * 4 if topk_weights is not None else 0
    for c in range(chunks):
        for step in range(1, num_ranks):
            p = (rank + step) % num_ranks
            start = prefix_host[p - 1][rank] if p > 0 else 0
            rows = prefix_host[p][rank] - start
            heap = peer_heaps[p].data_ptr()
            slot = (rank - (rank > p)) * capacity
            if c == 0 and weight_row and rows:
                # All of a peer's weights in one copy ahead of its rows: the first chunk's epoch covers them.
                copy_bytes(heap + regions["weights"] + slot * weight_row, topk_weights.data_ptr() + start * weight_row,
                           rows * weight_row, stream)
            lo, hi = chunk_rows(rows, chunks, c)
            if hi <= lo:
                continue
            copy_bytes(heap + regions["data"] + (slot + lo) * row_bytes, x.data_ptr() + (start + lo) * row_bytes,
                       (hi - lo) * row_bytes, stream)
            copy_bytes(heap + arrived_off + (rank * _FLAG_STRIDE.value + c) * 8, value.data_ptr(), 8, stream)


def combine_by_copy(*, x: torch.Tensor, topk_weights: torch.Tensor | None, in_rank: torch.Tensor,
                    prefix: torch.Tensor, prefix_host: tuple[tuple[int, ...], ...], biases: list[torch.Tensor],
                    out: torch.Tensor, out_weights: torch.Tensor | None, regions: dict, capacity: int,
                    heap_ptrs: torch.Tensor, peer_heaps: list[torch.Tensor], flags: dict, epoch: torch.Tensor,
                    value: torch.Tensor, copy_stream, programs: int, prev_programs: int, rank: int, max_wait: int,
                    error_addr: int, interpret: bool, dummy: torch.Tensor) -> None:
    """One combine: copies on ``copy_stream`` (forked from and joined back into the current stream;
    ``None`` under the interpreter, where copies run in place), the reduce on the current stream.

    Args as :func:`moekit.ep.kernels.combine.combine_round`, plus: ``prefix_host`` the rank prefix
    matrix as host ints; ``capacity`` rows each peer's slot of the region holds (every block fits);
    ``peer_heaps`` every rank's heap bytes; ``value`` an int64 [1] scratch word for this call's epoch;
    ``programs`` the reduce programs (the whole SM budget).
    """
    num_ranks = heap_ptrs.numel()
    num_tokens, hidden = out.shape
    num_topk = topk_weights.shape[1] if topk_weights is not None else 0
    has_weights = topk_weights is not None
    common = dict(NUM_RANKS=num_ranks, INTERPRET=interpret)

    # The copies are queued before the reduce that waits for them (and for the peers' copies): with
    # every rank sending before it waits, no host-side wait that drains the device (a module load, a
    # synchronising allocation) can stall a rank behind its own spinning reduce.
    current = None if copy_stream is None else torch.cuda.current_stream()
    if copy_stream is not None:
        copy_stream.wait_stream(current)
    with torch.cuda.stream(copy_stream) if copy_stream is not None else contextlib.nullcontext():
        clear_to_copy_kernel[(1,)](heap_ptrs, flags["consumed"], epoch, value, prev_programs, rank, max_wait,
                                   error_addr, **flag_blocks(num_ranks, prev_programs), **common, num_warps=4)
        copy_back(x=x, topk_weights=topk_weights, prefix_host=prefix_host, peer_heaps=peer_heaps, regions=regions,
                  capacity=capacity, arrived_off=flags["arrived"], value=value, rank=rank,
                  stream=copy_stream.cuda_stream if copy_stream is not None else None)
    # Scanned along the rows of the transpose: a scan down the columns of [N, R] runs one thread per column.
    place = in_rank.t().contiguous().cumsum(dim=1, dtype=torch.int32) if in_rank.numel() else dummy
    tile = reduce_tiles(hidden, num_ranks)
    bias = [b if b.numel() else dummy for b in biases] + [dummy] * (2 - len(biases))
    reduce_copied_kernel[(programs,)](
        x if x.numel() else dummy, topk_weights if has_weights and topk_weights.numel() else dummy, place,
        in_rank if in_rank.numel() else dummy, prefix, bias[0], bias[1], out if out.numel() else dummy,
        out_weights if has_weights and out_weights.numel() else dummy, num_tokens, hidden, num_topk, capacity,
        regions["data"], regions["weights"], heap_ptrs, flags["arrived"], flags["consumed"], epoch,
        rank, max_wait, error_addr, CHUNKS=chunks_per_peer(num_ranks), NUM_BIASES=len(biases), HAS_WEIGHTS=has_weights,
        BLOCK_T=tile["BLOCK_T"], BLOCK_H=tile["BLOCK_H"], ALIGN=tile["ALIGN"],
        BLOCK_K=next_pow2(max(num_topk, 1)), BLOCK_R=next_pow2(num_ranks), **common, num_warps=NUM_WARPS)
    if copy_stream is not None:
        current.wait_stream(copy_stream)

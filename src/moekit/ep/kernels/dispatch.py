"""High-throughput dispatch kernel, one round per launch, and the flag protocol shared with combine.

A round moves the rows whose final position at their receiver falls in ``[lo, hi)``. A launch runs two
kinds of programs. Send program q (of ``P_s``) takes a contiguous share of this rank's tokens, derives
the position of each token's row at each rank from ``is_token_in_rank`` and the rank prefix matrix
(no position table is built beforehand), and writes the row with its metadata straight into the
receiver's heap region at slot ``position - lo``; rows a rank keeps for itself go directly to its
outputs in round 0. Receive program r (of ``P_r``) copies what send programs r, r + P_r, ... of every
peer have written so far into this rank's fresh outputs while those sends go on, so the copy
overlaps the transfer.

Flags (int64 words; one writer each; values only grow, epochs counting rounds of both dispatch and
combine):
* ``progress[s, q]`` in the receiver's heap: ``epoch << 32 | done << 31 | rows`` from send program q of
  rank s, published (release) every few tiles after the rows it counts, and once more at its end;
* ``start[s, q]`` in the receiver's heap: the region slot where those rows begin this round, stored
  before the first publish;
* ``consumed[j, q]`` in rank s's heap: raised by receive program q of rank j once it has read its
  region. A send waits for ``consumed`` of the previous round (dispatch or combine), so a region is
  never overwritten while it is read.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.sync import (error_pointer, op_code, peer_pointer, poll, record_timeout, signal,
                                   signal_where, wait_all_geq)

OP_DISPATCH = tl.constexpr(op_code("dispatch"))
# Flag words per (rank, program): the most programs of one kind (send or receive) a launch may use.
MAX_PROGRAMS = 128
_FLAG_STRIDE = tl.constexpr(MAX_PROGRAMS)
# Tokens per step when counting a program's earlier tokens.
_COUNT_BLOCK = tl.constexpr(1024)
# int32 words of rows a program moves per step (64 KiB: 32 words, eight 16-byte vectors, per thread at 16 warps),
# enough loads in flight to keep NVLink busy from few programs.
_TILE_WORDS = 16384
NUM_WARPS = 16
# The rows field of a progress word (epoch << 32 | done << 31 | rows).
_ROWS = tl.constexpr((1 << 31) - 1)
# Tiles a send program moves between two publishes of its progress. A publish waits until the
# program's stores have reached the peer; publishing after every tile still measured fastest, as the
# receivers start copying sooner.
PUBLISH_EVERY = 1
# Of a dispatch's programs, the share that sends. Receivers copy within one GPU, several times faster
# per program than senders write over NVLink, so fewer of them keep up.
DISPATCH_SEND_SHARE = 0.67
# int32 words a receive program copies per step: its loads in flight are what bound its copy rate.
RECEIVE_WORDS = 16384
# Elements of the small arrays (scales, top-k, source index) a receive program copies per step.
_META_BLOCK = 2048
# The row arrays a dispatch fills, in the kernel's argument order.
_ARRAYS = ("data", "scales", "idx", "weights", "src")


@triton.jit
def wait_peers(heap_ptrs, flags_off, rank, num_programs, target, max_wait, error_addr, op,
               NUM_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr):
    """Waits until flags[s, q] >= target in this rank's heap for every peer s != rank, q < num_programs."""
    lanes = tl.arange(0, BLOCK_R * BLOCK_P)
    peer = lanes // BLOCK_P
    prog = lanes % BLOCK_P
    mask = (peer < NUM_RANKS) & (peer != rank) & (prog < num_programs)
    flags = peer_pointer(heap_ptrs, rank, flags_off, tl.int64) + tl.where(mask, peer * _FLAG_STRIDE + prog, 0)
    wait_all_geq(flags, mask, target, peer, max_wait, error_pointer(error_addr), op, rank, INTERPRET)
    tl.debug_barrier()


@triton.jit
def share(begin, count, index, parts):
    """Share ``index`` of ``parts`` contiguous shares of the items [begin, begin + count), as int64 [lo, hi)."""
    per = tl.cdiv(count, parts)
    lo = (begin + index * per).to(tl.int64)
    return lo, tl.minimum(lo + per, begin + count)


@triton.jit
def signal_peers(heap_ptrs, flags_off, rank, index, value, NUM_RANKS: tl.constexpr):
    """Raises word flags[rank, index] to ``value`` in every peer's heap, after all of this program's
    earlier memory accesses (the barrier orders every thread's before the release)."""
    tl.debug_barrier()
    word = flags_off + (rank * _FLAG_STRIDE + index) * 8
    for peer in tl.static_range(NUM_RANKS):
        if peer != rank:
            signal(peer_pointer(heap_ptrs, peer, word, tl.int64), value)


@triton.jit
def progress_word(epoch, rows, DONE: tl.constexpr):
    """A progress flag's value: ``rows`` written in round ``epoch`` (and, with ``DONE``, all of them)."""
    value = (epoch.to(tl.int64) << 32) | rows.to(tl.int64)
    if DONE:
        value = value | (1 << 31)
    return value


@triton.jit
def is_done(value):
    """Whether a progress flag's value says its writer is done."""
    return ((value >> 31) & 1) == 1


@triton.jit
def publish(heap_ptrs, progress_off, rank, index, rows, epoch, DONE: tl.constexpr, NUM_RANKS: tl.constexpr,
            BLOCK_R: tl.constexpr):
    """Raises progress[rank, index] in each peer j's heap to (epoch, rows[j], DONE), after all of this
    program's earlier stores. ``rows``: [BLOCK_R], per rank."""
    tl.debug_barrier()
    ranks = tl.arange(0, BLOCK_R)
    peers = (ranks < NUM_RANKS) & (ranks != rank)
    bases = tl.load(heap_ptrs + ranks, mask=peers, other=0)
    words = (bases + progress_off + (rank * _FLAG_STRIDE + index) * 8).to(tl.pointer_type(tl.int64))
    signal_where(words, progress_word(epoch, rows, DONE), peers)


@triton.jit
def wait_rows(flag_ptrs, need, epoch, rows, peers, max_wait, error_ptr, op, rank, INTERPRET: tl.constexpr):
    """Spins until every progress flag under ``need`` carries ``epoch`` and more than ``rows`` rows
    (all operands of one shape), with the time limit and error record of :func:`wait_all`."""
    values = poll(flag_ptrs, INTERPRET)
    ready = ~need | (((values >> 32) == epoch) & ((values & _ROWS) > rows))
    if INTERPRET:
        start = 0
    else:
        start = tl.extra.cuda.globaltimer()
    waited = start - start
    while (tl.min(ready.to(tl.int32)) == 0) & (waited < max_wait):
        values = poll(flag_ptrs, INTERPRET)
        ready = ~need | (((values >> 32) == epoch) & ((values & _ROWS) > rows))
        if INTERPRET:
            waited += 1
        else:
            waited = tl.extra.cuda.globaltimer() - start
    if tl.min(ready.to(tl.int32)) == 0:
        record_timeout(error_ptr, op, rank, tl.min(tl.where(ready, 1 << 30, peers)))
    tl.debug_barrier()


@triton.jit
def column(tile, j, BLOCK_R: tl.constexpr):
    """Column ``j`` of an integer [BLOCK_T, BLOCK_R] tile, as a [BLOCK_T] vector."""
    return tl.sum(tl.where(tl.arange(0, BLOCK_R)[None, :] == j, tile, 0), axis=1)


@triton.jit
def row_pointers(base, slot, row_bytes, ALIGN: tl.constexpr, DTYPE: tl.constexpr):
    """Per-row pointers ``base + slot * row_bytes`` (bytes), typed ``DTYPE``; every address is a multiple
    of ``ALIGN``, which lets the compiler move rows in 16-byte vectors."""
    # The hint goes on the pointers: the compiler does not carry it through the integer-to-pointer cast.
    return tl.multiple_of((base + slot * row_bytes).to(tl.pointer_type(DTYPE)), ALIGN)


@triton.jit
def copy_rows(src, dst, load_rows, store_rows, words, BLOCK_W: tl.constexpr):
    """dst[i, :words] = src[i, :words] (0 where not load_rows[i]) for each row i with store_rows[i];
    ``src`` and ``dst`` are [BLOCK_T] int32 row pointers, the masks [BLOCK_T, 1]."""
    w_offs = tl.arange(0, BLOCK_W)
    for wb in range(0, tl.cdiv(words, BLOCK_W)):
        w = wb * BLOCK_W + w_offs
        wm = (w < words)[None, :]
        tile = tl.load(src[:, None] + w[None, :], mask=load_rows & wm, other=0)
        tl.store(dst[:, None] + w[None, :], tile, mask=store_rows & wm)


@triton.jit
def tokens_per_rank(in_rank_ptr, end, NUM_RANKS: tl.constexpr, BLOCK_R: tl.constexpr):
    """int32 [BLOCK_R]: how many of the tokens [0, end) go to each rank."""
    toks = tl.arange(0, _COUNT_BLOCK)
    ranks = tl.arange(0, BLOCK_R)
    total = tl.zeros([BLOCK_R], dtype=tl.int32)
    for t0 in range(0, end, _COUNT_BLOCK):
        t = t0 + toks
        mask = (t < end)[:, None] & (ranks < NUM_RANKS)[None, :]
        goes = tl.load(in_rank_ptr + t[:, None] * NUM_RANKS + ranks[None, :], mask=mask, other=0)
        total += tl.sum(goes.to(tl.int32), axis=0)
    return total


@triton.jit
def destination(out_addr, heap_ptrs, reg_off, j, rank):
    """Byte address of an array's first row at rank ``j``: this rank's output when j is this rank,
    else array ``reg_off`` of j's heap region."""
    return tl.where(j == rank, out_addr, tl.load(heap_ptrs + j) + reg_off)


# Send program q of P: for each token t of its share with in_rank[t, j], the row's position at rank j is
# p = prefix[rank - 1, j] (rows of lower ranks; 0 on rank 0) + #{t' < t : in_rank[t', j]}. When lo <= p < hi
# (j a peer; slot p - lo of j's heap region) or in round 0 with p < out_rows (j this rank; row p of the outputs):
#   data[slot] = x[t];  scales[slot] = x_scales[t];  src[slot] = t;
#   idx[slot, k] = topk[t, k] - j * E_loc if that lies in [0, E_loc) else -1;  weights[slot, k] = w[t, k] or 0 likewise
# A tile of BLOCK_T rows is loaded once and stored to every rank it goes to, through per-row pointers.
# A program's rows at a peer fill consecutive slots from start[rank, q]: it publishes how many are written.
@triton.jit
def _dispatch_send(q, P, x_ptr, scales_ptr, scale_stride_t, scale_stride_c, topk_ptr, weights_ptr, in_rank_ptr,
                   prefix_ptr, num_tokens, words, num_scales, num_topk, experts_per_rank, lo, hi, round_idx, out_rows,
                   out_data, out_scales, out_idx, out_weights, out_src, reg_data, reg_scales, reg_idx, reg_weights,
                   reg_src, heap_ptrs, progress_off, start_off, consumed_off, epoch, prev_programs, rank, max_wait,
                   error_addr, NUM_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_IDX: tl.constexpr,
                   HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr,
                   BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                   PUBLISH: tl.constexpr, INTERPRET: tl.constexpr):
    wait_peers(heap_ptrs, consumed_off, rank, prev_programs, epoch - 1, max_wait, error_addr, OP_DISPATCH,
               NUM_RANKS, BLOCK_R, BLOCK_P, INTERPRET)
    t_begin, t_end = share(0, num_tokens, q, P)
    ranks = tl.arange(0, BLOCK_R)
    real_rank = ranks < NUM_RANKS
    peers = real_rank & (ranks != rank)
    before = tl.load(prefix_ptr + tl.maximum(rank - 1, 0) * NUM_RANKS + ranks, mask=real_rank & (rank > 0), other=0)
    before += tokens_per_rank(in_rank_ptr, t_begin, NUM_RANKS, BLOCK_R)
    bases = tl.load(heap_ptrs + ranks, mask=peers, other=0)
    starts = (bases + start_off + (rank * _FLAG_STRIDE + q) * 8).to(tl.pointer_type(tl.int64))
    tl.store(starts, (tl.minimum(tl.maximum(before, lo), hi) - lo).to(tl.int64), mask=peers)
    own = ranks[None, :] == rank
    toks = tl.arange(0, BLOCK_T)
    w_offs = tl.arange(0, BLOCK_W)
    s_offs = tl.arange(0, BLOCK_S)
    k_offs = tl.arange(0, BLOCK_K)
    row_bytes = words.to(tl.int64) * 4
    written = tl.zeros([BLOCK_R], dtype=tl.int32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + toks
        tm = t < t_end
        goes = tl.load(in_rank_ptr + t[:, None] * NUM_RANKS + ranks[None, :], mask=tm[:, None] & real_rank[None, :],
                       other=0).to(tl.int32)
        pos = before[None, :] + tl.cumsum(goes, axis=0) - 1
        before += tl.sum(goes, axis=0)
        in_round = tl.where(own, (round_idx == 0) & (pos < out_rows), (pos >= lo) & (pos < hi))
        send = ((goes != 0) & in_round).to(tl.int32)
        written += tl.sum(send, axis=0)
        slots = tl.where(own, pos, pos - lo).to(tl.int64)
        for wb in range(0, tl.cdiv(words, BLOCK_W)):
            w = wb * BLOCK_W + w_offs
            wm = (w < words)[None, :]
            tile = tl.load(x_ptr + t[:, None] * words + w[None, :], mask=tm[:, None] & wm)
            for j in tl.static_range(NUM_RANKS):
                dst = row_pointers(destination(out_data, heap_ptrs, reg_data, j, rank), column(slots, j, BLOCK_R),
                                   row_bytes, ALIGN, tl.int32)
                tl.store(dst[:, None] + w[None, :], tile, mask=(column(send, j, BLOCK_R) != 0)[:, None] & wm)
        if HAS_SCALES:
            sm = tm[:, None] & (s_offs < num_scales)[None, :]
            sv = tl.load(scales_ptr + t[:, None] * scale_stride_t + s_offs[None, :] * scale_stride_c, mask=sm)
            for j in tl.static_range(NUM_RANKS):
                sdst = row_pointers(destination(out_scales, heap_ptrs, reg_scales, j, rank), column(slots, j, BLOCK_R),
                                    num_scales * 4, 4, tl.float32)
                tl.store(sdst[:, None] + s_offs[None, :], sv, mask=(column(send, j, BLOCK_R) != 0)[:, None] & sm)
        if HAS_IDX:
            km = tm[:, None] & (k_offs < num_topk)[None, :]
            expert = tl.load(topk_ptr + t[:, None] * num_topk + k_offs[None, :], mask=km, other=-1)
            if HAS_WEIGHTS:
                wv = tl.load(weights_ptr + t[:, None] * num_topk + k_offs[None, :], mask=km, other=0.0)
            for j in tl.static_range(NUM_RANKS):
                slot = column(slots, j, BLOCK_R)
                sent = (column(send, j, BLOCK_R) != 0)[:, None] & km
                local = expert - j * experts_per_rank
                here = (expert >= 0) & (local >= 0) & (local < experts_per_rank)
                idst = row_pointers(destination(out_idx, heap_ptrs, reg_idx, j, rank), slot, num_topk * 8, 8, tl.int64)
                tl.store(idst[:, None] + k_offs[None, :], tl.where(here, local, -1), mask=sent)
                if HAS_WEIGHTS:
                    wdst = row_pointers(destination(out_weights, heap_ptrs, reg_weights, j, rank), slot, num_topk * 4,
                                        4, tl.float32)
                    tl.store(wdst[:, None] + k_offs[None, :], tl.where(here, wv, 0.0), mask=sent)
        for j in tl.static_range(NUM_RANKS):
            src_dst = row_pointers(destination(out_src, heap_ptrs, reg_src, j, rank), column(slots, j, BLOCK_R), 4, 4,
                                   tl.int32)
            tl.store(src_dst, t.to(tl.int32), mask=column(send, j, BLOCK_R) != 0)
        if ((t0 - t_begin) // BLOCK_T) % PUBLISH == PUBLISH - 1:
            publish(heap_ptrs, progress_off, rank, q, written, epoch, False, NUM_RANKS, BLOCK_R)
    publish(heap_ptrs, progress_off, rank, q, written, epoch, True, NUM_RANKS, BLOCK_R)


# Region slots [a, min(b, end - lo)) -> output rows slot + lo:
#   data[slot + lo] = region_data[slot];  likewise scales, idx, weights, src
# Both sides are contiguous ranges of each array, so each is copied flat: the data in blocks of BLOCK_C
# words (no per-row addresses), the four small arrays together in blocks of BLOCK_M elements.
# Loads are ".cg" (from L2): peers wrote these rows, and this SM's L1 may hold stale lines of them.
@triton.jit
def _copy_received(a, b, lo, end, words, num_scales, num_topk, heap, out_data, out_scales, out_idx, out_weights,
                   out_src, reg_data, reg_scales, reg_idx, reg_weights, reg_src, HAS_SCALES: tl.constexpr,
                   HAS_IDX: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    rows = tl.maximum(tl.minimum(b, end - lo) - a, 0).to(tl.int64)
    first = a.to(tl.int64)
    data_src = tl.multiple_of((heap + reg_data + first * words * 4).to(tl.pointer_type(tl.int32)), ALIGN)
    data_dst = tl.multiple_of((out_data + (first + lo) * words * 4).to(tl.pointer_type(tl.int32)), ALIGN)
    offs = tl.arange(0, BLOCK_C)
    for i in range(0, rows * words, BLOCK_C):
        m = i + offs < rows * words
        tl.store(data_dst + i + offs, tl.load(data_src + i + offs, mask=m, cache_modifier=".cg"), mask=m)
    meta = tl.arange(0, BLOCK_M)
    for i in range(0, rows * tl.maximum(tl.maximum(num_scales, num_topk), 1), BLOCK_M):
        e = i + meta
        if HAS_SCALES:
            ssrc = (heap + reg_scales + first * num_scales * 4).to(tl.pointer_type(tl.float32))
            sdst = (out_scales + (first + lo) * num_scales * 4).to(tl.pointer_type(tl.float32))
            sm = e < rows * num_scales
            tl.store(sdst + e, tl.load(ssrc + e, mask=sm, cache_modifier=".cg"), mask=sm)
        km = e < rows * num_topk
        if HAS_IDX:
            isrc = (heap + reg_idx + first * num_topk * 8).to(tl.pointer_type(tl.int64))
            idst = (out_idx + (first + lo) * num_topk * 8).to(tl.pointer_type(tl.int64))
            tl.store(idst + e, tl.load(isrc + e, mask=km, cache_modifier=".cg"), mask=km)
        if HAS_WEIGHTS:
            wsrc = (heap + reg_weights + first * num_topk * 4).to(tl.pointer_type(tl.float32))
            wdst = (out_weights + (first + lo) * num_topk * 4).to(tl.pointer_type(tl.float32))
            tl.store(wdst + e, tl.load(wsrc + e, mask=km, cache_modifier=".cg"), mask=km)
        rm = e < rows
        src = (heap + reg_src + first * 4).to(tl.pointer_type(tl.int32))
        tl.store((out_src + (first + lo) * 4).to(tl.pointer_type(tl.int32)) + e,
                 tl.load(src + e, mask=rm, cache_modifier=".cg"), mask=rm)


# Output rows p in [a, b) past the real rows (num_worst_tokens): data 0, scales 0, idx -1, weights 0, src -1
@triton.jit
def _pad_rows(a, b, words, num_scales, num_topk, out_data, out_scales, out_idx, out_weights, out_src,
              HAS_SCALES: tl.constexpr, HAS_IDX: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr,
              BLOCK_W: tl.constexpr, ALIGN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    toks = tl.arange(0, BLOCK_T)
    w_offs = tl.arange(0, BLOCK_W)
    s_offs = tl.arange(0, BLOCK_S)
    k_offs = tl.arange(0, BLOCK_K)
    row_bytes = words.to(tl.int64) * 4
    for p0 in range(a, b, BLOCK_T):
        p = p0 + toks
        im = (p < b)[:, None]
        data = row_pointers(out_data, p, row_bytes, ALIGN, tl.int32)
        for wb in range(0, tl.cdiv(words, BLOCK_W)):
            w = wb * BLOCK_W + w_offs
            tl.store(data[:, None] + w[None, :], tl.zeros([BLOCK_T, BLOCK_W], tl.int32), mask=im & (w < words)[None, :])
        if HAS_SCALES:
            sdst = row_pointers(out_scales, p, num_scales * 4, 4, tl.float32)
            tl.store(sdst[:, None] + s_offs[None, :], tl.zeros([BLOCK_T, BLOCK_S], tl.float32),
                     mask=im & (s_offs < num_scales)[None, :])
        km = im & (k_offs < num_topk)[None, :]
        if HAS_IDX:
            idst = row_pointers(out_idx, p, num_topk * 8, 8, tl.int64)
            tl.store(idst[:, None] + k_offs[None, :], tl.full([BLOCK_T, BLOCK_K], -1, tl.int64), mask=km)
        if HAS_WEIGHTS:
            wdst = row_pointers(out_weights, p, num_topk * 4, 4, tl.float32)
            tl.store(wdst[:, None] + k_offs[None, :], tl.zeros([BLOCK_T, BLOCK_K], tl.float32), mask=km)
        tl.store(row_pointers(out_src, p, 4, 4, tl.int32), tl.full([BLOCK_T], -1, tl.int32), mask=p < b)


# Receive program r of P_r: fills its share of this round's padding rows, then, until every send program
# q = r + k * P_r (k = 0, 1, ...) of every peer is done, copies the region slots each has published since the
# last look (see _copy_received).
@triton.jit
def _dispatch_receive(r, receivers, senders, prefix_ptr, lo, hi, out_rows, words, num_scales, num_topk, out_data,
                      out_scales, out_idx, out_weights, out_src, reg_data, reg_scales, reg_idx, reg_weights, reg_src,
                      heap_ptrs, progress_off, start_off, consumed_off, epoch, rank, max_wait, error_addr,
                      NUM_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_IDX: tl.constexpr,
                      HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    end = tl.minimum(hi, out_rows)
    pad_from = tl.maximum(tl.load(prefix_ptr + (NUM_RANKS - 1) * NUM_RANKS + rank), lo)
    pad_lo, pad_hi = share(pad_from, tl.maximum(end - pad_from, 0), r, receivers)
    _pad_rows(pad_lo, pad_hi, words, num_scales, num_topk, out_data, out_scales, out_idx, out_weights, out_src,
              HAS_SCALES, HAS_IDX, HAS_WEIGHTS, BLOCK_T, BLOCK_W, ALIGN, BLOCK_S, BLOCK_K)
    heap = tl.load(heap_ptrs + rank)
    # One lane per (peer, send program) this program serves.
    lanes = tl.arange(0, BLOCK_R * BLOCK_Q)
    peer = lanes // BLOCK_Q
    writer = r + (lanes % BLOCK_Q) * receivers
    served = (peer < NUM_RANKS) & (peer != rank) & (writer < senders)
    word = tl.where(served, peer * _FLAG_STRIDE + writer, 0) * 8
    flags = (heap + progress_off + word).to(tl.pointer_type(tl.int64))
    copied = tl.zeros([BLOCK_R * BLOCK_Q], dtype=tl.int64)
    finished = 0
    if INTERPRET:
        since = 0
    else:
        since = tl.extra.cuda.globaltimer()
    idle = since - since
    while (finished == 0) & (idle < max_wait):
        values = poll(flags, INTERPRET)
        ours = served & ((values >> 32) == epoch)
        published = tl.where(ours, values & _ROWS, 0)
        done = ~served | (ours & is_done(values))
        pending = published - copied
        most = tl.max(pending, axis=0)
        if most > 0:
            tl.debug_barrier()
            lane = tl.argmax(pending, axis=0)
            start = heap + start_off + tl.sum(tl.where(lanes == lane, word, 0), axis=0)
            first = tl.load(start.to(tl.pointer_type(tl.int64)), volatile=True) + \
                tl.sum(tl.where(lanes == lane, copied, 0), axis=0)
            _copy_received(first, first + most, lo, end, words, num_scales, num_topk, heap, out_data, out_scales,
                           out_idx, out_weights, out_src, reg_data, reg_scales, reg_idx, reg_weights, reg_src,
                           HAS_SCALES, HAS_IDX, HAS_WEIGHTS, ALIGN, BLOCK_C, BLOCK_M)
            copied += tl.where(lanes == lane, most, 0)
        finished = ((tl.min(done.to(tl.int32), axis=0) == 1) & (most <= 0)).to(tl.int32)
        if INTERPRET:
            idle = tl.where(most > 0, 0, idle + 1)
        else:
            now = tl.extra.cuda.globaltimer()
            since = tl.where(most > 0, now, since)
            idle = now - since
    if finished == 0:
        values = poll(flags, INTERPRET)
        late = tl.min(tl.where(served & ~(((values >> 32) == epoch) & is_done(values)), peer, 1 << 30), axis=0)
        record_timeout(error_pointer(error_addr), OP_DISPATCH, rank, late)
    signal_peers(heap_ptrs, consumed_off, rank, r, epoch, NUM_RANKS)


# Programs [0, senders) send (_dispatch_send), the rest receive (_dispatch_receive).
@triton.jit(do_not_specialize=["num_tokens", "lo", "hi", "round_idx", "out_rows", "prev_programs", "rank", "senders"])
def dispatch_kernel(x_ptr, scales_ptr, scale_stride_t, scale_stride_c, topk_ptr, weights_ptr, in_rank_ptr, prefix_ptr,
                    num_tokens, words, num_scales, num_topk, experts_per_rank, lo, hi, round_idx, out_rows,
                    out_data, out_scales, out_idx, out_weights, out_src, reg_data, reg_scales, reg_idx, reg_weights,
                    reg_src, heap_ptrs, progress_off, start_off, consumed_off, epoch_ptr, prev_programs, senders, rank,
                    max_wait, error_addr, NUM_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_IDX: tl.constexpr,
                    HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, PUBLISH: tl.constexpr,
                    INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + round_idx + 1
    pid = tl.program_id(0)
    if pid < senders:
        _dispatch_send(pid, senders, x_ptr, scales_ptr, scale_stride_t, scale_stride_c, topk_ptr, weights_ptr,
                       in_rank_ptr, prefix_ptr, num_tokens, words, num_scales, num_topk, experts_per_rank, lo, hi,
                       round_idx, out_rows, out_data, out_scales, out_idx, out_weights, out_src, reg_data, reg_scales,
                       reg_idx, reg_weights, reg_src, heap_ptrs, progress_off, start_off, consumed_off, epoch,
                       prev_programs, rank, max_wait, error_addr, NUM_RANKS, HAS_SCALES, HAS_IDX, HAS_WEIGHTS, BLOCK_T,
                       BLOCK_W, ALIGN, BLOCK_S, BLOCK_K, BLOCK_R, BLOCK_P, PUBLISH, INTERPRET)
    else:
        _dispatch_receive(pid - senders, tl.num_programs(0) - senders, senders, prefix_ptr, lo, hi, out_rows, words,
                          num_scales, num_topk, out_data, out_scales, out_idx, out_weights, out_src, reg_data,
                          reg_scales, reg_idx, reg_weights, reg_src, heap_ptrs, progress_off, start_off, consumed_off,
                          epoch, rank, max_wait, error_addr, NUM_RANKS, HAS_SCALES, HAS_IDX, HAS_WEIGHTS, BLOCK_T,
                          BLOCK_W, ALIGN, BLOCK_S, BLOCK_K, BLOCK_R, BLOCK_Q, BLOCK_C, BLOCK_M, INTERPRET)


@functools.cache
def flag_blocks(num_ranks: int, num_programs: int) -> dict:
    """Block sizes of the flag waits for ``num_programs`` writers on each of ``num_ranks`` ranks."""
    return {"BLOCK_R": next_pow2(num_ranks), "BLOCK_P": next_pow2(max(num_programs, 1))}


@functools.cache
def row_tiles(words: int, tile: int = _TILE_WORDS) -> dict:
    """Tile of rows of ``words`` 4-byte words one step moves: BLOCK_W words (a power of two that divides
    the row where one from 128 to 1024 does, so no lane idles), BLOCK_T rows, about ``tile`` words in
    all; ALIGN, the byte alignment every row has (rows start 16-byte aligned when words % 4 == 0)."""
    block_w = min(next_pow2(max(words, 4)), 1024)
    while block_w > 128 and words % block_w:
        block_w //= 2
    return {"BLOCK_T": max(1, min(tile // block_w, 64)), "BLOCK_W": block_w, "ALIGN": 16 if words % 4 == 0 else 4}


def split_programs(programs: int, send_share: float) -> tuple[int, int]:
    """(senders, receivers) of a launch of ``programs`` (>= 2) programs, about ``send_share`` of them sending."""
    senders = min(max(round(programs * send_share), 1), programs - 1)
    return senders, programs - senders


def dispatch_round(*, x_words: torch.Tensor, scales: torch.Tensor | None, topk_idx: torch.Tensor | None,
                   topk_weights: torch.Tensor | None, in_rank: torch.Tensor, prefix: torch.Tensor, outputs: dict,
                   regions: dict, experts_per_rank: int, lo: int, hi: int, round_idx: int, out_rows: int,
                   heap_ptrs: torch.Tensor, flags: dict, epoch: torch.Tensor, senders: int, receivers: int,
                   prev_programs: int, rank: int, max_wait: int, error_addr: int, interpret: bool,
                   dummy: torch.Tensor) -> None:
    """Launches one dispatch round (``senders`` send and ``receivers`` receive programs) on the current stream.

    Args:
        x_words: int32 [N, W], the rows as 4-byte words. scales: float32 [N, S] (any strides) or None.
        topk_idx: int64 [N, K] or None; topk_weights: float32 [N, K] or None.
        in_rank: uint8 [N, R], is_token_in_rank. prefix: int32 [R, R], the rank prefix matrix (entry
            [s, j]: where rank s's block ends in rank j's rows; the last row holds the real row counts).
        outputs / regions: addresses of this rank's outputs, byte offsets of the heap arrays, keyed
            data, scales, idx, weights, src.
        flags: byte offsets of the heap's flag arrays, keyed progress, start, consumed.
        epoch: int64 [1] rounds completed before this call; this round's epoch is epoch + round_idx + 1.
        senders, receivers: programs of each kind (every rank must use the same).
        prev_programs: receive programs of the previous launch, whose ``consumed`` flags the sends wait for.
    """
    num_ranks = heap_ptrs.numel()
    words = x_words.shape[1]
    num_scales = scales.shape[1] if scales is not None else 0
    num_topk = topk_idx.shape[1] if topk_idx is not None else 0
    dispatch_kernel[(senders + receivers,)](
        x_words if x_words.numel() else dummy, scales if scales is not None and scales.numel() else dummy,
        scales.stride(0) if scales is not None else 0, scales.stride(1) if scales is not None else 0,
        topk_idx if topk_idx is not None and topk_idx.numel() else dummy,
        topk_weights if topk_weights is not None and topk_weights.numel() else dummy,
        in_rank if in_rank.numel() else dummy, prefix, x_words.shape[0], words, num_scales, num_topk,
        experts_per_rank, lo, hi, round_idx, out_rows, *(outputs[k] for k in _ARRAYS), *(regions[k] for k in _ARRAYS),
        heap_ptrs, flags["progress"], flags["start"], flags["consumed"], epoch, prev_programs, senders, rank, max_wait,
        error_addr, NUM_RANKS=num_ranks, HAS_SCALES=scales is not None, HAS_IDX=topk_idx is not None,
        HAS_WEIGHTS=topk_weights is not None, **row_tiles(words), BLOCK_S=next_pow2(max(num_scales, 1)),
        BLOCK_K=next_pow2(max(num_topk, 1)), **flag_blocks(num_ranks, prev_programs),
        BLOCK_Q=next_pow2(-(-senders // receivers)), BLOCK_C=RECEIVE_WORDS, BLOCK_M=_META_BLOCK,
        PUBLISH=PUBLISH_EVERY, INTERPRET=interpret, num_warps=NUM_WARPS)

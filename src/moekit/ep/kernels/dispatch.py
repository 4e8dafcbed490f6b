"""High-throughput dispatch kernels, one round at a time, and the flag protocol shared with combine.

A round moves the rows whose final position at their receiver falls in ``[lo, hi)``; each send
program derives the positions of its tokens from ``is_token_in_rank`` and the rank prefix matrix
(no position table is built beforehand). Its first launch (send) writes each such row, with its
metadata, straight into the receiver's heap region at slot ``position - lo``; rows a rank keeps for
itself go directly to its outputs in round 0. Its second
launch (receive) waits for every peer's send programs, copies the region into this rank's fresh
output tensors and tells the peers the region may be reused.

Flags (int64, epochs that only grow; one writer each): ``ready[s, q]`` in rank j's heap is raised by
send program q of rank s once its rows for j are written; ``consumed[j, q]`` in rank s's heap is raised
by receive program q of rank j once j has read its region. A send waits for ``consumed`` of the
previous round (dispatch or combine), so a region is never overwritten while it is read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.sync import error_pointer, op_code, peer_pointer, signal, wait_all_geq

OP_DISPATCH = tl.constexpr(op_code("dispatch"))
# Flag words per (rank, program): the most programs one launch may use.
MAX_PROGRAMS = 128
_FLAG_STRIDE = tl.constexpr(MAX_PROGRAMS)
# Tokens per step when counting a program's earlier tokens.
_COUNT_BLOCK = tl.constexpr(1024)
# int32 words of rows a program moves per step (64 KiB: 32 words, eight 16-byte vectors, per thread at 16 warps),
# enough loads in flight to keep NVLink busy from few programs.
_TILE_WORDS = 16384
NUM_WARPS = 16


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
def program_slice(begin, count):
    """This program's contiguous share [lo, hi) of the items [begin, begin + count), as int64."""
    per_program = tl.cdiv(count, tl.num_programs(0))
    lo = (begin + tl.program_id(0) * per_program).to(tl.int64)
    return lo, tl.minimum(lo + per_program, begin + count)


@triton.jit
def signal_peers(heap_ptrs, flags_off, rank, value, NUM_RANKS: tl.constexpr):
    """Raises this program's word flags[rank, program] to ``value`` in every peer's heap, after all
    of the program's earlier stores (the barrier orders every thread's stores before the release)."""
    tl.debug_barrier()
    word = flags_off + (rank * _FLAG_STRIDE + tl.program_id(0)) * 8
    for peer in tl.static_range(NUM_RANKS):
        if peer != rank:
            signal(peer_pointer(heap_ptrs, peer, word, tl.int64), value)


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


# Token t's row at rank j, when in_rank[t, j]: p = prefix[rank - 1, j] (rows of lower ranks; 0 on rank 0)
# + #{t' < t : in_rank[t', j]}. When lo <= p < hi (j a peer; slot p - lo of j's heap region) or in round 0 with
# p < out_rows (j this rank; row p of the outputs):
#   data[slot] = x[t];  scales[slot] = x_scales[t];  src[slot] = t;
#   idx[slot, k] = topk[t, k] - j * E_loc if that lies in [0, E_loc) else -1;  weights[slot, k] = w[t, k] or 0 likewise
# Each program takes a contiguous share of the tokens in tiles of BLOCK_T: a tile of rows is loaded once
# and stored to every rank it goes to, through per-row destination pointers.
@triton.jit(do_not_specialize=["num_tokens", "lo", "hi", "round_idx", "out_rows", "prev_programs", "rank"])
def dispatch_send_kernel(x_ptr, scales_ptr, scale_stride_t, scale_stride_c, topk_ptr, weights_ptr, in_rank_ptr,
                         prefix_ptr, num_tokens, words, num_scales, num_topk, experts_per_rank, lo, hi, round_idx,
                         out_rows, out_data, out_scales, out_idx, out_weights, out_src,
                         reg_data, reg_scales, reg_idx, reg_weights, reg_src,
                         heap_ptrs, ready_off, consumed_off, epoch_ptr, prev_programs, rank, max_wait, error_addr,
                         NUM_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_IDX: tl.constexpr,
                         HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                         INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + round_idx + 1
    wait_peers(heap_ptrs, consumed_off, rank, prev_programs, epoch - 1, max_wait, error_addr, OP_DISPATCH,
               NUM_RANKS, BLOCK_R, BLOCK_P, INTERPRET)
    t_begin, t_end = program_slice(0, num_tokens)
    ranks = tl.arange(0, BLOCK_R)
    real_rank = ranks < NUM_RANKS
    before = tl.load(prefix_ptr + tl.maximum(rank - 1, 0) * NUM_RANKS + ranks, mask=real_rank & (rank > 0), other=0)
    before += tokens_per_rank(in_rank_ptr, t_begin, NUM_RANKS, BLOCK_R)
    own = ranks[None, :] == rank
    toks = tl.arange(0, BLOCK_T)
    w_offs = tl.arange(0, BLOCK_W)
    s_offs = tl.arange(0, BLOCK_S)
    k_offs = tl.arange(0, BLOCK_K)
    row_bytes = words.to(tl.int64) * 4
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + toks
        tm = t < t_end
        goes = tl.load(in_rank_ptr + t[:, None] * NUM_RANKS + ranks[None, :], mask=tm[:, None] & real_rank[None, :],
                       other=0).to(tl.int32)
        pos = before[None, :] + tl.cumsum(goes, axis=0) - 1
        before += tl.sum(goes, axis=0)
        in_round = tl.where(own, (round_idx == 0) & (pos < out_rows), (pos >= lo) & (pos < hi))
        send = ((goes != 0) & in_round).to(tl.int32)
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
    signal_peers(heap_ptrs, ready_off, rank, epoch, NUM_RANKS)


# Rows p in [lo, end), end = min(hi, out_rows), outside this rank's block [own_lo, own_hi): with a <= b the
# block's ends clamped to [lo, end), the i-th such row (i < (a - lo) + (end - b)) is lo + i if i < a - lo,
# else b + i - (a - lo). Then:
#   out[p] = region[p - lo] if p < real_rows else padding (data 0, scales 0, idx -1, weights 0, src -1)
# Spreading only these rows over the programs keeps every program busy (this rank's own rows are
# already in place); they go in tiles of BLOCK_T rows.
@triton.jit(do_not_specialize=["lo", "hi", "out_rows", "round_idx", "send_programs", "rank"])
def dispatch_receive_kernel(prefix_ptr, lo, hi, out_rows, words, num_scales, num_topk,
                            out_data, out_scales, out_idx, out_weights, out_src,
                            reg_data, reg_scales, reg_idx, reg_weights, reg_src,
                            heap_ptrs, ready_off, consumed_off, epoch_ptr, round_idx, send_programs, rank, max_wait,
                            error_addr, NUM_RANKS: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_IDX: tl.constexpr,
                            HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
                            ALIGN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + round_idx + 1
    wait_peers(heap_ptrs, ready_off, rank, send_programs, epoch, max_wait, error_addr, OP_DISPATCH,
               NUM_RANKS, BLOCK_R, BLOCK_P, INTERPRET)
    own_lo = tl.load(prefix_ptr + tl.maximum(rank - 1, 0) * NUM_RANKS + rank, mask=rank > 0, other=0)
    own_hi = tl.load(prefix_ptr + rank * NUM_RANKS + rank)
    real_rows = tl.load(prefix_ptr + (NUM_RANKS - 1) * NUM_RANKS + rank)
    end = tl.maximum(tl.minimum(hi, out_rows), lo)
    a = tl.minimum(tl.maximum(own_lo, lo), end)
    b = tl.minimum(tl.maximum(own_hi, a), end)
    i_begin, i_end = program_slice(0, (a - lo) + (end - b))
    heap = tl.load(heap_ptrs + rank)
    toks = tl.arange(0, BLOCK_T)
    s_offs = tl.arange(0, BLOCK_S)
    k_offs = tl.arange(0, BLOCK_K)
    row_bytes = words.to(tl.int64) * 4
    for i0 in range(i_begin, i_end, BLOCK_T):
        i = i0 + toks
        im = (i < i_end)[:, None]
        p = tl.where(i < a - lo, lo + i, b + i - (a - lo))
        slot = p - lo
        real = (p < real_rows)[:, None]
        copy_rows(row_pointers(heap + reg_data, slot, row_bytes, ALIGN, tl.int32),
                  row_pointers(out_data, p, row_bytes, ALIGN, tl.int32), im & real, im, words, BLOCK_W)
        if HAS_SCALES:
            m = im & (s_offs < num_scales)[None, :]
            ssrc = row_pointers(heap + reg_scales, slot, num_scales * 4, 4, tl.float32)
            sdst = row_pointers(out_scales, p, num_scales * 4, 4, tl.float32)
            tl.store(sdst[:, None] + s_offs[None, :], tl.load(ssrc[:, None] + s_offs[None, :], mask=m & real, other=0.0),
                     mask=m)
        km = im & (k_offs < num_topk)[None, :]
        if HAS_IDX:
            isrc = row_pointers(heap + reg_idx, slot, num_topk * 8, 8, tl.int64)
            idst = row_pointers(out_idx, p, num_topk * 8, 8, tl.int64)
            tl.store(idst[:, None] + k_offs[None, :], tl.load(isrc[:, None] + k_offs[None, :], mask=km & real, other=-1),
                     mask=km)
        if HAS_WEIGHTS:
            wsrc = row_pointers(heap + reg_weights, slot, num_topk * 4, 4, tl.float32)
            wdst = row_pointers(out_weights, p, num_topk * 4, 4, tl.float32)
            tl.store(wdst[:, None] + k_offs[None, :], tl.load(wsrc[:, None] + k_offs[None, :], mask=km & real, other=0.0),
                     mask=km)
        src_idx = tl.load(row_pointers(heap + reg_src, slot, 4, 4, tl.int32), mask=(i < i_end) & (p < real_rows),
                          other=-1)
        tl.store(row_pointers(out_src, p, 4, 4, tl.int32), src_idx, mask=i < i_end)
    signal_peers(heap_ptrs, consumed_off, rank, epoch, NUM_RANKS)


def flag_blocks(num_ranks: int, num_programs: int) -> dict:
    """Block sizes of the flag waits for ``num_programs`` writers on each of ``num_ranks`` ranks."""
    return {"BLOCK_R": triton.next_power_of_2(num_ranks), "BLOCK_P": triton.next_power_of_2(max(num_programs, 1))}


def row_tiles(words: int, tile: int = _TILE_WORDS) -> dict:
    """Tile of rows of ``words`` 4-byte words one step moves: BLOCK_W words (a power of two that divides
    the row where one from 128 to 1024 does, so no lane idles), BLOCK_T rows, about ``tile`` words in
    all; ALIGN, the byte alignment every row has (rows start 16-byte aligned when words % 4 == 0)."""
    block_w = min(triton.next_power_of_2(max(words, 4)), 1024)
    while block_w > 128 and words % block_w:
        block_w //= 2
    return {"BLOCK_T": max(1, min(tile // block_w, 64)), "BLOCK_W": block_w, "ALIGN": 16 if words % 4 == 0 else 4}


def dispatch_round(*, x_words: torch.Tensor, scales: torch.Tensor | None, topk_idx: torch.Tensor | None,
                   topk_weights: torch.Tensor | None, in_rank: torch.Tensor, prefix: torch.Tensor, outputs: dict,
                   regions: dict, experts_per_rank: int, lo: int, hi: int, round_idx: int, out_rows: int,
                   heap_ptrs: torch.Tensor, ready_off: int, consumed_off: int, epoch: torch.Tensor,
                   num_programs: int, prev_programs: int, rank: int, max_wait: int, error_addr: int,
                   interpret: bool, dummy: torch.Tensor) -> None:
    """Launches one dispatch round (send, then receive) on the current stream.

    Args:
        x_words: int32 [N, W], the rows as 4-byte words. scales: float32 [N, S] (any strides) or None.
        topk_idx: int64 [N, K] or None; topk_weights: float32 [N, K] or None.
        in_rank: uint8 [N, R], is_token_in_rank. prefix: int32 [R, R], the rank prefix matrix (entry
            [s, j]: where rank s's block ends in rank j's rows; the last row holds the real row counts).
        outputs / regions: addresses of this rank's outputs, byte offsets of the heap arrays, keyed
            data, scales, idx, weights, src.
        epoch: int64 [1] rounds completed before this call; this round's epoch is epoch + round_idx + 1.
    """
    num_ranks = heap_ptrs.numel()
    words = x_words.shape[1]
    num_scales = scales.shape[1] if scales is not None else 0
    num_topk = topk_idx.shape[1] if topk_idx is not None else 0
    common = dict(NUM_RANKS=num_ranks, HAS_SCALES=scales is not None, HAS_IDX=topk_idx is not None,
                  HAS_WEIGHTS=topk_weights is not None, **row_tiles(words),
                  BLOCK_S=triton.next_power_of_2(max(num_scales, 1)), BLOCK_K=triton.next_power_of_2(max(num_topk, 1)),
                  INTERPRET=interpret, num_warps=NUM_WARPS)
    out = [outputs[k] for k in ("data", "scales", "idx", "weights", "src")]
    reg = [regions[k] for k in ("data", "scales", "idx", "weights", "src")]
    dispatch_send_kernel[(num_programs,)](
        x_words if x_words.numel() else dummy, scales if scales is not None and scales.numel() else dummy,
        scales.stride(0) if scales is not None else 0, scales.stride(1) if scales is not None else 0,
        topk_idx if topk_idx is not None and topk_idx.numel() else dummy,
        topk_weights if topk_weights is not None and topk_weights.numel() else dummy,
        in_rank if in_rank.numel() else dummy, prefix, x_words.shape[0], words, num_scales, num_topk,
        experts_per_rank, lo, hi, round_idx, out_rows, *out, *reg, heap_ptrs, ready_off, consumed_off, epoch,
        prev_programs, rank, max_wait, error_addr, **flag_blocks(num_ranks, prev_programs), **common)
    dispatch_receive_kernel[(num_programs,)](
        prefix, lo, hi, out_rows, words, num_scales, num_topk, *out, *reg, heap_ptrs, ready_off, consumed_off, epoch,
        round_idx, num_programs, rank, max_wait, error_addr, **flag_blocks(num_ranks, num_programs), **common)

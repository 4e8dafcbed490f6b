"""High-throughput combine kernel, one round per launch (the reverse of dispatch).

A round covers the source tokens ``[tok_lo, tok_hi)``. A launch runs ``P_s`` send and ``P_r`` reduce
programs. For each peer s, send program q takes the q-th of ``P_s`` contiguous shares of the rows this
rank received from s, and writes each row whose token lies in the round into s's heap region at
slot ``(t - tok_lo) * (R - 1) + (this rank's index among s's peers)``; it publishes how many rows of
its share it has passed, every few tiles. Reduce program r takes a share of this rank's tokens: for a
tile of tokens it works out where each token's row lies at each rank (hence which send program
writes it), waits until those rows are published, then sums them in float32 in rank order (this
rank's own rows read straight from the input, never staged), adds the biases and writes bf16.
Flags as in :mod:`moekit.ep.kernels.dispatch`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.dispatch import (NUM_WARPS, PUBLISH_EVERY, _FLAG_STRIDE, copy_rows, flag_blocks, progress_word,
                                        row_pointers, row_tiles, share, signal_peers, tokens_per_rank, wait_peers,
                                        wait_rows)
from moekit.ep.kernels.sync import error_pointer, op_code, peer_pointer, signal

OP_COMBINE = tl.constexpr(op_code("combine"))
# bf16 elements (over all ranks) a reduce step loads at once: every rank's partial tile is in flight
# together (and the next step's too, see sum_rows), which is what keeps a program's reads fast; per
# thread at 16 warps, 32 values (more spill). Measured on 2 x H200 (24 programs, 4096 tokens of
# 7168, copy-engine combine, before sum_rows loaded a step ahead): tiles of 8 tokens x 1024 per rank
# took 267 us, against 266-423 us for 16 x 512, 4 x 2048, 4 x 1024, 2 x 4096 and 1 x 8192, and
# 318-323 us for 16 x 1024 (twice the elements).
_REDUCE_ELEMENTS = 16384
# Of a combine's programs, the share that sends; the reducers read two rows and write one per row sent.
COMBINE_SEND_SHARE = 0.25
# Tokens a reduce program waits for at once: one poll of their rows' progress flags per this many tokens.
_WAIT_TOKENS = 64


@triton.jit
def bf16_bits(value):
    """float32 -> bf16 bit pattern (uint16) rounded to nearest even, NaN kept quiet: the rounding torch
    uses, written out because the interpreter's own conversion truncates."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(value != value, (bits >> 16) | 0x40, rounded).to(tl.uint16)


# out[t] = bf16(((0 + sum over j = 0..R-1 with present[t, j] of f32(*rows[t, j])) + f32(bias0[t])) + f32(bias1[t]))
# out_weights[t] = 0 + sum over the same j of *weight_rows[t, j] (float32 [K] rows), with HAS_WEIGHTS
# for the tokens t of a tile, rows[t, j] and weight_rows[t, j] being the byte addresses of what rank j sent back for t.
# A step of BLOCK_H channels loads every rank's [BLOCK_T, BLOCK_H] piece as one [BLOCK_T, BLOCK_R, BLOCK_H]
# block while the step before is summed and stored (2-3% off a combine on 2 x H200, both paths, every
# size measured), and picks the ranks out of it in order (a sum over the rank axis where one term is
# not 0: exact).
@triton.jit
def sum_rows(rows, weight_rows, present, t, tm, bias0_ptr, bias1_ptr, out_ptr, out_weights_ptr, hidden, num_topk,
             NUM_RANKS: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr,
             BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ALIGN: tl.constexpr):
    ranks = tl.arange(0, BLOCK_R)
    rank_axis = ranks[None, :, None]
    h_offs = tl.arange(0, BLOCK_H)
    bases = tl.multiple_of(rows.to(tl.pointer_type(tl.bfloat16)), [ALIGN, ALIGN])[:, :, None]
    wanted = tm[:, None, None] & present[:, :, None]
    # ".cg" (from L2): peers wrote these rows, and this SM's L1 may hold stale lines.
    step = tl.load(bases + h_offs[None, None, :], mask=wanted & (h_offs < hidden)[None, None, :], other=0.0,
                   cache_modifier=".cg")
    for hb in range(0, tl.cdiv(hidden, BLOCK_H)):
        h = hb * BLOCK_H + h_offs
        ahead = h + BLOCK_H
        following = tl.load(bases + ahead[None, None, :], mask=wanted & (ahead < hidden)[None, None, :], other=0.0,
                            cache_modifier=".cg")
        acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(NUM_RANKS):
            acc += tl.sum(tl.where(rank_axis == j, step.to(tl.float32), 0.0), axis=1)
        hm = tm[:, None] & (h < hidden)[None, :]
        if NUM_BIASES >= 1:
            acc += tl.load(bias0_ptr + t[:, None] * hidden + h[None, :], mask=hm).to(tl.float32)
        if NUM_BIASES >= 2:
            acc += tl.load(bias1_ptr + t[:, None] * hidden + h[None, :], mask=hm).to(tl.float32)
        tl.store(out_ptr.to(tl.pointer_type(tl.uint16)) + t[:, None] * hidden + h[None, :], bf16_bits(acc), mask=hm)
        step = following
    if HAS_WEIGHTS:
        k_offs = tl.arange(0, BLOCK_K)
        km = tm[:, None] & (k_offs < num_topk)[None, :]
        wacc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        for j in tl.static_range(NUM_RANKS):
            pick = ranks[None, :] == j
            here = tl.sum(tl.where(pick, present, 0), axis=1) != 0
            row = tl.sum(tl.where(pick, weight_rows, 0), axis=1).to(tl.pointer_type(tl.float32))
            wacc += tl.load(row[:, None] + k_offs[None, :], mask=km & here[:, None], other=0.0, cache_modifier=".cg")
        tl.store(out_weights_ptr + t[:, None] * num_topk + k_offs[None, :], wacc, mask=km)


# Send program q of P, for each peer s: rows p = b0 + o of s's block [b0, b1) = [prefix[s - 1, rank], prefix[s, rank])
# (source token t = src_idx[p]), o in share q of [0, b1 - b0), with tok_lo <= t < tok_hi:
#   region_s[(t - tok_lo) * (R - 1) + (rank - (rank > s))] = x[p];  weights likewise
# progress[rank, q] at s: epoch << 32 | how many rows of the share are passed.
@triton.jit
def _combine_send(q, P, x_ptr, weights_ptr, src_idx_ptr, prefix_ptr, words, num_topk, tok_lo, tok_hi, reg_data,
                  reg_weights, heap_ptrs, progress_off, consumed_off, epoch, prev_programs, rank, max_wait, error_addr,
                  NUM_RANKS: tl.constexpr, PEERS: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_W: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_P: tl.constexpr, PUBLISH: tl.constexpr, INTERPRET: tl.constexpr):
    wait_peers(heap_ptrs, consumed_off, rank, prev_programs, epoch - 1, max_wait, error_addr, OP_COMBINE,
               NUM_RANKS, BLOCK_R, BLOCK_P, INTERPRET)
    toks = tl.arange(0, BLOCK_T)
    k_offs = tl.arange(0, BLOCK_K)
    row_bytes = words.to(tl.int64) * 4
    word = progress_off + (rank * _FLAG_STRIDE + q) * 8
    for s in tl.static_range(NUM_RANKS):
        if s != rank:
            if s > 0:
                b0 = tl.load(prefix_ptr + (s - 1) * NUM_RANKS + rank)
            else:
                b0 = 0
            o_lo, o_hi = share(0, tl.load(prefix_ptr + s * NUM_RANKS + rank) - b0, q, P)
            heap = tl.load(heap_ptrs + s)
            flag = peer_pointer(heap_ptrs, s, word, tl.int64)
            my_slot = rank - (rank > s).to(tl.int32)
            for o0 in range(o_lo, o_hi, BLOCK_T):
                o = o0 + toks
                p = b0 + o
                t = tl.load(src_idx_ptr + p, mask=o < o_hi, other=-1)
                keep = ((o < o_hi) & (t >= tok_lo) & (t < tok_hi))[:, None]
                slot = ((t - tok_lo) * PEERS + my_slot).to(tl.int64)
                copy_rows(x_ptr + p * words, row_pointers(heap + reg_data, slot, row_bytes, ALIGN, tl.int32), keep,
                          keep, words, BLOCK_W)
                if HAS_WEIGHTS:
                    km = keep & (k_offs < num_topk)[None, :]
                    wdst = row_pointers(heap + reg_weights, slot, num_topk * 4, 4, tl.float32)
                    tl.store(wdst[:, None] + k_offs[None, :],
                             tl.load(weights_ptr + p[:, None] * num_topk + k_offs[None, :], mask=km), mask=km)
                if ((o0 - o_lo) // BLOCK_T) % PUBLISH == PUBLISH - 1:
                    tl.debug_barrier()
                    signal(flag, progress_word(epoch, tl.minimum(o0 + BLOCK_T, o_hi) - o_lo, False))
            tl.debug_barrier()
            signal(flag, progress_word(epoch, tl.maximum(o_hi - o_lo, 0), True))


# Reduce program r of P_r, for each token t of its share of [tok_lo, min(tok_hi, N)): with o_j(t) = #{t' < t :
# in_rank[t', j]} the token's place in this rank's block at rank j, its row there is written by send program
# o_j(t) // ceil(n_j / P_s) of rank j (n_j = the block's rows). Once published:
#   out[t] = bf16(((0 + sum over j = 0..R-1 with in_rank[t, j] of f32(row_j)) + f32(bias0[t])) + f32(bias1[t]))
#   row_j = x[prefix[rank - 1, rank] + o_rank(t)] for j = rank, else region[(t - tok_lo) * (R - 1) + j - (j > rank)]
#   out_weights[t] = the same sum of the weights (float32, no bias)
@triton.jit
def _combine_reduce(r, receivers, senders, x_ptr, weights_ptr, in_rank_ptr, prefix_ptr, bias0_ptr, bias1_ptr,
                    out_ptr, out_weights_ptr, num_tokens, hidden, num_topk, tok_lo, tok_hi, reg_data, reg_weights,
                    heap_ptrs, progress_off, consumed_off, epoch, rank, max_wait, error_addr, NUM_RANKS: tl.constexpr,
                    PEERS: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    WAIT_T: tl.constexpr, INTERPRET: tl.constexpr):
    t_begin, t_end = share(tok_lo, tl.minimum(tok_hi, num_tokens) - tok_lo, r, receivers)
    ranks = tl.arange(0, BLOCK_R)
    real_rank = ranks < NUM_RANKS
    block_lo = tl.load(prefix_ptr + tl.maximum(rank - 1, 0) * NUM_RANKS + ranks, mask=real_rank & (rank > 0), other=0)
    block_rows = tl.load(prefix_ptr + rank * NUM_RANKS + ranks, mask=real_rank, other=0) - block_lo
    per_writer = tl.maximum(tl.cdiv(block_rows, senders), 1)
    placed = tokens_per_rank(in_rank_ptr, t_begin, NUM_RANKS, BLOCK_R)
    own_lo = tl.sum(tl.where(ranks == rank, block_lo, 0), axis=0)
    heap = tl.load(heap_ptrs + rank)
    flags = (heap + progress_off).to(tl.pointer_type(tl.int64))
    toks = tl.arange(0, BLOCK_T)
    row_bytes = hidden.to(tl.int64) * 2
    for s0 in range(t_begin, t_end, WAIT_T):
        # One wait for the next WAIT_T tokens' rows, then their sums in tiles of BLOCK_T tokens.
        ts = s0 + tl.arange(0, WAIT_T)
        coming = tl.load(in_rank_ptr + ts[:, None] * NUM_RANKS + ranks[None, :],
                         mask=(ts < t_end)[:, None] & real_rank[None, :], other=0).to(tl.int32)
        at = placed[None, :] + tl.cumsum(coming, axis=0) - 1
        need = (coming != 0) & (ranks[None, :] != rank)
        writer = tl.where(need, at // per_writer[None, :], 0)
        wait_rows(flags + tl.where(need, ranks[None, :], 0) * _FLAG_STRIDE + writer, need, epoch,
                  at - writer * per_writer[None, :], ranks[None, :] + writer * 0, max_wait,
                  error_pointer(error_addr), OP_COMBINE, rank, INTERPRET)
        for t0 in range(s0, tl.minimum(s0 + WAIT_T, t_end), BLOCK_T):
            t = t0 + toks
            tm = t < t_end
            goes = tl.load(in_rank_ptr + t[:, None] * NUM_RANKS + ranks[None, :],
                           mask=tm[:, None] & real_rank[None, :], other=0).to(tl.int32)
            place = placed[None, :] + tl.cumsum(goes, axis=0) - 1
            placed += tl.sum(goes, axis=0)
            own_row = (own_lo + tl.sum(tl.where(ranks[None, :] == rank, place, 0), axis=1)).to(tl.int64)
            slot = ((t - tok_lo) * PEERS)[:, None] + ranks[None, :] - (ranks[None, :] > rank).to(tl.int32)
            own = ranks[None, :] == rank
            rows = tl.where(own, x_ptr.to(tl.int64) + own_row[:, None] * row_bytes, heap + reg_data + slot * row_bytes)
            weight_rows = tl.where(own, weights_ptr.to(tl.int64) + own_row[:, None] * num_topk * 4,
                                   heap + reg_weights + slot * num_topk * 4)
            sum_rows(rows, weight_rows, goes != 0, t, tm, bias0_ptr, bias1_ptr, out_ptr, out_weights_ptr, hidden,
                     num_topk, NUM_RANKS, NUM_BIASES, HAS_WEIGHTS, BLOCK_T, BLOCK_H, BLOCK_K, BLOCK_R, ALIGN)
    signal_peers(heap_ptrs, consumed_off, rank, r, epoch, NUM_RANKS)


# Programs [0, senders) send (_combine_send), the rest reduce (_combine_reduce).
@triton.jit(do_not_specialize=["num_tokens", "tok_lo", "tok_hi", "round_idx", "prev_programs", "senders", "rank"])
def combine_kernel(x_ptr, weights_ptr, src_idx_ptr, in_rank_ptr, prefix_ptr, bias0_ptr, bias1_ptr, out_ptr,
                   out_weights_ptr, num_tokens, words, num_topk, tok_lo, tok_hi, round_idx, reg_data, reg_weights,
                   heap_ptrs, progress_off, consumed_off, epoch_ptr, prev_programs, senders, rank, max_wait, error_addr,
                   NUM_RANKS: tl.constexpr, PEERS: tl.constexpr, NUM_BIASES: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr, REDUCE_T: tl.constexpr,
                   REDUCE_H: tl.constexpr, REDUCE_ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_P: tl.constexpr, WAIT_T: tl.constexpr, PUBLISH: tl.constexpr, INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + round_idx + 1
    pid = tl.program_id(0)
    if pid < senders:
        _combine_send(pid, senders, x_ptr, weights_ptr, src_idx_ptr, prefix_ptr, words, num_topk, tok_lo, tok_hi,
                      reg_data, reg_weights, heap_ptrs, progress_off, consumed_off, epoch, prev_programs, rank,
                      max_wait, error_addr, NUM_RANKS, PEERS, HAS_WEIGHTS, BLOCK_T, BLOCK_W, ALIGN, BLOCK_K, BLOCK_R,
                      BLOCK_P, PUBLISH, INTERPRET)
    else:
        _combine_reduce(pid - senders, tl.num_programs(0) - senders, senders, x_ptr, weights_ptr, in_rank_ptr,
                        prefix_ptr, bias0_ptr, bias1_ptr, out_ptr, out_weights_ptr, num_tokens, words * 2, num_topk,
                        tok_lo, tok_hi, reg_data, reg_weights, heap_ptrs, progress_off, consumed_off, epoch, rank,
                        max_wait, error_addr, NUM_RANKS, PEERS, NUM_BIASES, HAS_WEIGHTS, REDUCE_T, REDUCE_H,
                        REDUCE_ALIGN, BLOCK_K, BLOCK_R, WAIT_T, INTERPRET)


@functools.cache
def reduce_tiles(hidden: int, num_ranks: int) -> dict:
    """A reduce step's tile, BLOCK_T tokens x BLOCK_H of each rank's row, and the byte alignment of
    its rows (16 when hidden % 8 == 0)."""
    tile = row_tiles(hidden, _REDUCE_ELEMENTS // next_pow2(num_ranks))  # bf16 elements, sized as words
    return {"BLOCK_T": tile["BLOCK_T"], "BLOCK_H": tile["BLOCK_W"], "ALIGN": 16 if hidden % 8 == 0 else 2}


def combine_round(*, x_words: torch.Tensor, topk_weights: torch.Tensor | None, src_idx: torch.Tensor,
                  prefix: torch.Tensor, in_rank: torch.Tensor, biases: list[torch.Tensor], out: torch.Tensor,
                  out_weights: torch.Tensor | None, regions: dict, tok_lo: int, tok_hi: int, round_idx: int,
                  heap_ptrs: torch.Tensor, flags: dict, epoch: torch.Tensor, senders: int, receivers: int,
                  prev_programs: int, rank: int, max_wait: int, error_addr: int, interpret: bool,
                  dummy: torch.Tensor) -> None:
    """Launches one combine round (``senders`` send and ``receivers`` reduce programs) on the current stream.

    Args:
        x_words: int32 [M, W], the processed rows (bf16 [M, H]) as 4-byte words.
        topk_weights: float32 [M, K] or None. src_idx: int32 [M] source token of each row (-1 padding).
        prefix: int32 [R, R], the rank prefix matrix (where each source's block ends in each rank's rows).
        in_rank: uint8 [N, R], this rank's is_token_in_rank. biases: up to two bf16 [N, H].
        out: bf16 [N, H]; out_weights: float32 [N, K] or None.
        regions: byte offsets of the heap arrays ``data`` (bf16 [T * (R - 1), H]) and ``weights``.
        flags: byte offsets of the heap's flag arrays, keyed progress, consumed.
        senders, receivers: programs of each kind (every rank must use the same).
    """
    num_ranks = heap_ptrs.numel()
    words = x_words.shape[1]
    num_tokens, hidden = out.shape
    num_topk = topk_weights.shape[1] if topk_weights is not None else 0
    has_weights = topk_weights is not None
    reduce = reduce_tiles(hidden, num_ranks)
    bias = [b if b.numel() else dummy for b in biases] + [dummy] * (2 - len(biases))
    combine_kernel[(senders + receivers,)](
        x_words if x_words.numel() else dummy, topk_weights if has_weights and topk_weights.numel() else dummy,
        src_idx if src_idx.numel() else dummy, in_rank if in_rank.numel() else dummy, prefix, bias[0], bias[1],
        out if out.numel() else dummy, out_weights if has_weights and out_weights.numel() else dummy, num_tokens,
        words, num_topk, tok_lo, tok_hi, round_idx, regions["data"], regions["weights"], heap_ptrs, flags["progress"],
        flags["consumed"], epoch, prev_programs, senders, rank, max_wait, error_addr, NUM_RANKS=num_ranks,
        PEERS=max(num_ranks - 1, 1), NUM_BIASES=len(biases), HAS_WEIGHTS=has_weights, **row_tiles(words),
        REDUCE_T=reduce["BLOCK_T"], REDUCE_H=reduce["BLOCK_H"], REDUCE_ALIGN=reduce["ALIGN"],
        BLOCK_K=next_pow2(max(num_topk, 1)), **flag_blocks(num_ranks, prev_programs), WAIT_T=_WAIT_TOKENS,
        PUBLISH=PUBLISH_EVERY, INTERPRET=interpret, num_warps=NUM_WARPS)

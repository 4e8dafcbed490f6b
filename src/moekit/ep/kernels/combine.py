"""High-throughput combine kernels, one round at a time (the reverse of dispatch).

A round covers the source tokens ``[tok_lo, tok_hi)``. Its first launch (send) writes each received
row whose token lies there back into its source rank's heap region at slot ``(t - tok_lo) * R + rank``;
its second launch (reduce) waits for every peer's send programs, then sums each token's slots in
float32, rank 0 first, adds the biases and writes bf16. Flags as in :mod:`moekit.ep.kernels.dispatch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.dispatch import NUM_WARPS, copy_rows, flag_blocks, program_slice, row_pointers, row_tiles, signal_peers, wait_peers
from moekit.ep.kernels.sync import op_code

OP_COMBINE = tl.constexpr(op_code("combine"))
# bf16 elements a reduce step sums per partial row block (16 float32 accumulators per thread at 16 warps):
# R such tiles are loaded at once, so this stays small enough for 8 ranks without spilling.
_REDUCE_TILE = 8192


@triton.jit
def bf16_bits(value):
    """float32 -> bf16 bit pattern (uint16) rounded to nearest even, NaN kept quiet: the rounding torch
    uses, written out because the interpreter's own conversion truncates."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(value != value, (bits >> 16) | 0x40, rounded).to(tl.uint16)


# For each received row p with source token t = src_idx[p] in [tok_lo, tok_hi), from source rank
# s = #{i in 1..R-1 : prefix[i - 1, rank] <= p}:   region_s[(t - tok_lo) * R + rank] = x[p];  weights likewise
# Rows go in tiles of BLOCK_T consecutive rows, each stored through its own destination pointer.
@triton.jit(do_not_specialize=["rows", "tok_lo", "tok_hi", "round_idx", "prev_programs", "rank"])
def combine_send_kernel(x_ptr, weights_ptr, src_idx_ptr, prefix_ptr, rows, words, num_topk, tok_lo, tok_hi,
                        round_idx, reg_data, reg_weights, heap_ptrs, ready_off, consumed_off, epoch_ptr,
                        prev_programs, rank, max_wait, error_addr, NUM_RANKS: tl.constexpr,
                        HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, ALIGN: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + round_idx + 1
    wait_peers(heap_ptrs, consumed_off, rank, prev_programs, epoch - 1, max_wait, error_addr, OP_COMBINE,
               NUM_RANKS, BLOCK_R, BLOCK_P, INTERPRET)
    r_offs = tl.arange(0, BLOCK_R)
    later = (r_offs >= 1) & (r_offs < NUM_RANKS)
    block_starts = tl.load(prefix_ptr + tl.maximum(r_offs - 1, 0) * NUM_RANKS + rank, mask=later, other=2147483647)
    p_begin, p_end = program_slice(0, rows)
    toks = tl.arange(0, BLOCK_T)
    k_offs = tl.arange(0, BLOCK_K)
    row_bytes = words.to(tl.int64) * 4
    for p0 in range(p_begin, p_end, BLOCK_T):
        p = p0 + toks
        t = tl.load(src_idx_ptr + p, mask=p < p_end, other=-1)
        keep = ((p < p_end) & (t >= tok_lo) & (t < tok_hi))[:, None]
        source = tl.sum((block_starts[None, :] <= p[:, None]).to(tl.int32), axis=1)
        heap = tl.load(heap_ptrs + source)
        slot = ((t - tok_lo) * NUM_RANKS + rank).to(tl.int64)
        copy_rows(x_ptr + p * words, row_pointers(heap + reg_data, slot, row_bytes, ALIGN, tl.int32), keep, keep, words,
                  BLOCK_W)
        if HAS_WEIGHTS:
            km = keep & (k_offs < num_topk)[None, :]
            wdst = row_pointers(heap + reg_weights, slot, num_topk * 4, 4, tl.float32)
            tl.store(wdst[:, None] + k_offs[None, :],
                     tl.load(weights_ptr + p[:, None] * num_topk + k_offs[None, :], mask=km), mask=km)
    signal_peers(heap_ptrs, ready_off, rank, epoch, NUM_RANKS)


# For each token t in [tok_lo, min(tok_hi, N)):
#   out[t] = bf16(((0 + sum over r = 0..R-1 with in_rank[t, r] of f32(region[(t - tok_lo) * R + r])) + f32(bias0[t])) + f32(bias1[t]))
#   out_weights[t] = the same sum of the weights slots (float32, no bias)
# A step takes a [BLOCK_T, BLOCK_H] tile: the R partial tiles are loaded together, then added in rank order.
@triton.jit(do_not_specialize=["num_tokens", "tok_lo", "tok_hi", "round_idx", "send_programs", "rank"])
def combine_reduce_kernel(in_rank_ptr, bias0_ptr, bias1_ptr, out_ptr, out_weights_ptr, num_tokens, hidden, num_topk,
                          tok_lo, tok_hi, round_idx, reg_data, reg_weights, heap_ptrs, ready_off, consumed_off,
                          epoch_ptr, send_programs, rank, max_wait, error_addr, NUM_RANKS: tl.constexpr,
                          NUM_BIASES: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_H: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr):
    epoch = tl.load(epoch_ptr) + round_idx + 1
    wait_peers(heap_ptrs, ready_off, rank, send_programs, epoch, max_wait, error_addr, OP_COMBINE,
               NUM_RANKS, BLOCK_R, BLOCK_P, INTERPRET)
    t_begin, t_end = program_slice(tok_lo, tl.minimum(tok_hi, num_tokens) - tok_lo)
    heap = tl.load(heap_ptrs + rank)
    out_bits = out_ptr.to(tl.pointer_type(tl.uint16))
    toks = tl.arange(0, BLOCK_T)
    h_offs = tl.arange(0, BLOCK_H)
    k_offs = tl.arange(0, BLOCK_K)
    row_bytes = hidden.to(tl.int64) * 2
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + toks
        tm = t < t_end
        first_slot = (t - tok_lo) * NUM_RANKS
        for hb in range(0, tl.cdiv(hidden, BLOCK_H)):
            h = hb * BLOCK_H + h_offs
            hm = tm[:, None] & (h < hidden)[None, :]
            acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
            for r in tl.static_range(NUM_RANKS):
                present = (tl.load(in_rank_ptr + t * NUM_RANKS + r, mask=tm, other=0) != 0)[:, None]
                row = row_pointers(heap + reg_data, first_slot + r, row_bytes, ALIGN, tl.bfloat16)
                acc += tl.load(row[:, None] + h[None, :], mask=hm & present, other=0.0).to(tl.float32)
            if NUM_BIASES >= 1:
                acc += tl.load(bias0_ptr + t[:, None] * hidden + h[None, :], mask=hm).to(tl.float32)
            if NUM_BIASES >= 2:
                acc += tl.load(bias1_ptr + t[:, None] * hidden + h[None, :], mask=hm).to(tl.float32)
            tl.store(out_bits + t[:, None] * hidden + h[None, :], bf16_bits(acc), mask=hm)
        if HAS_WEIGHTS:
            km = tm[:, None] & (k_offs < num_topk)[None, :]
            wacc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
            for r in tl.static_range(NUM_RANKS):
                present = (tl.load(in_rank_ptr + t * NUM_RANKS + r, mask=tm, other=0) != 0)[:, None]
                slot = row_pointers(heap + reg_weights, first_slot + r, num_topk * 4, 4, tl.float32)
                wacc += tl.load(slot[:, None] + k_offs[None, :], mask=km & present, other=0.0)
            tl.store(out_weights_ptr + t[:, None] * num_topk + k_offs[None, :], wacc, mask=km)
    signal_peers(heap_ptrs, consumed_off, rank, epoch, NUM_RANKS)


def combine_round(*, x_words: torch.Tensor, topk_weights: torch.Tensor | None, src_idx: torch.Tensor,
                  prefix: torch.Tensor, in_rank: torch.Tensor, biases: list[torch.Tensor], out: torch.Tensor,
                  out_weights: torch.Tensor | None, regions: dict, tok_lo: int, tok_hi: int, round_idx: int,
                  heap_ptrs: torch.Tensor, ready_off: int, consumed_off: int, epoch: torch.Tensor,
                  num_programs: int, prev_programs: int, rank: int, max_wait: int, error_addr: int,
                  interpret: bool, dummy: torch.Tensor) -> None:
    """Launches one combine round (send, then reduce) on the current stream.

    Args:
        x_words: int32 [M, W], the processed rows (bf16 [M, H]) as 4-byte words.
        topk_weights: float32 [M, K] or None. src_idx: int32 [M] source token of each row (-1 padding).
        prefix: int32 [R, R], the rank prefix matrix (where each source's block ends in each rank's rows).
        in_rank: uint8 [N, R], this rank's is_token_in_rank. biases: up to two bf16 [N, H].
        out: bf16 [N, H]; out_weights: float32 [N, K] or None.
        regions: byte offsets of the heap arrays ``data`` (bf16 [T * R, H]) and ``weights``.
    """
    num_ranks = heap_ptrs.numel()
    rows, words = x_words.shape
    num_tokens, hidden = out.shape
    num_topk = topk_weights.shape[1] if topk_weights is not None else 0
    has_weights = topk_weights is not None
    block_k = triton.next_power_of_2(max(num_topk, 1))
    combine_send_kernel[(num_programs,)](
        x_words if x_words.numel() else dummy, topk_weights if has_weights and topk_weights.numel() else dummy,
        src_idx if src_idx.numel() else dummy, prefix, rows, words, num_topk, tok_lo, tok_hi, round_idx,
        regions["data"], regions["weights"], heap_ptrs, ready_off, consumed_off, epoch, prev_programs, rank, max_wait,
        error_addr, NUM_RANKS=num_ranks, HAS_WEIGHTS=has_weights, **row_tiles(words), BLOCK_K=block_k,
        INTERPRET=interpret, num_warps=NUM_WARPS, **flag_blocks(num_ranks, prev_programs))
    tiles = row_tiles(hidden, _REDUCE_TILE)  # tiles of bf16 elements, sized as the send's tiles of words
    bias = [b if b.numel() else dummy for b in biases] + [dummy] * (2 - len(biases))
    combine_reduce_kernel[(num_programs,)](
        in_rank if in_rank.numel() else dummy, bias[0], bias[1], out if out.numel() else dummy,
        out_weights if has_weights and out_weights.numel() else dummy, num_tokens, hidden, num_topk, tok_lo, tok_hi,
        round_idx, regions["data"], regions["weights"], heap_ptrs, ready_off, consumed_off, epoch, num_programs, rank,
        max_wait, error_addr, NUM_RANKS=num_ranks, NUM_BIASES=len(biases), HAS_WEIGHTS=has_weights,
        BLOCK_T=tiles["BLOCK_T"], BLOCK_H=tiles["BLOCK_W"], ALIGN=16 if hidden % 8 == 0 else 2, BLOCK_K=block_k,
        INTERPRET=interpret, num_warps=NUM_WARPS, **flag_blocks(num_ranks, num_programs))

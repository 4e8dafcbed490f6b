"""Low-latency combine kernels: the send (expert outputs back to their tokens' ranks) and the
receive (the hook: each token's weighted sum).

Heap areas of one parity (see ``low_latency_dispatch``): ``params`` int64 [R], ``flags`` int64
[E_loc, R] and, reusing the receive area, bf16 [T, K, H]: one row per (token, top-k slot) of
this rank's tokens. ``flags[le, d]`` on rank s counts the arrivals of rank d's send programs of
(le, s), as in the dispatch: each adds its share after its rows, and the flag reaches ``epoch <<
32`` once the rows of (le, s) have landed; program (0, s, 0) writes ``params[d]`` before its share.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.low_latency_dispatch import (TILE, arrival_share, check_call, finish_call, start_call,
                                                   wait_call)
from moekit.ep.kernels.sync import error_pointer


# ---------------------------------------------------------------------------------------------- send
# Program (le, s, c) on rank d: rows begin..begin+n-1 of expert le's slab came from rank s
# (layout_range[le, s] = (begin << 32) | n); words [c * SPAN, (c + 1) * SPAN) of row r go to slot
# (src_info[r], src_slot[r]) of rank s's [T, K, H] area. Then it adds arrival_share(c, C) to
# flags[le, d] on s (C programs per (le, s)).
@triton.jit
def low_latency_combine_send_kernel(
        x_ptr, src_info, src_slot, layout_range, ptrs, epochs_ptr, parity, half_base, call_params, params_off,
        flags_off, recv_off, rank, NUM_RANKS: tl.constexpr, T: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
        CHUNKS: tl.constexpr, SPAN: tl.constexpr, BLOCK: tl.constexpr, TILE_ROWS: tl.constexpr):
    le = tl.program_id(0)
    s = tl.program_id(1)
    c = tl.program_id(2)
    start_call(epochs_ptr, parity)
    packed = tl.load(layout_range + le * NUM_RANKS + s)
    begin = packed >> 32
    n = (packed & 0xFFFFFFFF).to(tl.int32)
    RT: tl.constexpr = NUM_RANKS * T
    WORDS: tl.constexpr = H // 2  # a bf16 row as int32 words (H is even)
    base = tl.load(ptrs + s) + half_base
    w = c * SPAN + tl.arange(0, BLOCK)
    live = (tl.arange(0, BLOCK) < SPAN) & (w < WORDS)
    r = tl.arange(0, TILE_ROWS)
    for j0 in range(0, n, TILE_ROWS):
        got = j0 + r < n
        row = le.to(tl.int64) * RT + begin + j0 + r
        tok = tl.load(src_info + row, mask=got, other=0).to(tl.int64)
        k = tl.load(src_slot + row, mask=got, other=0)
        # Rows are 16-byte aligned (2 * H is a multiple of 16): wide stores.
        dst = tl.multiple_of((base + recv_off + (tok * K + k) * (2 * H)).to(tl.pointer_type(tl.int32)), 16)
        src = x_ptr.to(tl.pointer_type(tl.int32)) + row * WORDS
        inside = got[:, None] & live[None, :]
        tl.store(dst[:, None] + w[None, :], tl.load(src[:, None] + w[None, :], mask=inside), mask=inside)
    if (le == 0) & (c == 0):
        tl.store((base + params_off + rank * 8).to(tl.pointer_type(tl.int64)), call_params)
    tl.debug_barrier()
    # Release: this program's rows (and params) land before its share is counted.
    tl.atomic_add((base + flags_off + (le * NUM_RANKS + rank) * 8).to(tl.pointer_type(tl.int64)),
                  arrival_share(c.to(tl.int64), tl.full([], CHUNKS, tl.int64)), sem="release", scope="sys")


def launch_combine_send(x: torch.Tensor, src_info: torch.Tensor, src_slot: torch.Tensor, layout_range: torch.Tensor,
                        ptrs: torch.Tensor, epochs: torch.Tensor, parity: int, half_base: int,
                        call_params: int, offsets: dict[str, int], rank: int, num_ranks: int, num_max_tokens: int,
                        num_topk: int) -> None:
    """Sends the valid rows of ``x`` bf16 [E_loc, R*T, H] (contiguous) back to their tokens' ranks."""
    e_loc, _, hidden = x.shape
    words = hidden // 2
    span = 4 * triton.cdiv(words, 4 * combine_send_chunks(num_max_tokens, words))  # 16-byte pieces
    chunks = triton.cdiv(words, span)
    block = next_pow2(span)
    low_latency_combine_send_kernel[(e_loc, num_ranks, chunks)](
        x, src_info, src_slot, layout_range, ptrs, epochs, parity, half_base, call_params, offsets["params"],
        offsets["flags"], offsets["recv"], rank, NUM_RANKS=num_ranks, T=num_max_tokens, K=num_topk, H=hidden,
        CHUNKS=chunks, SPAN=span, BLOCK=block, TILE_ROWS=max(1, TILE // block), num_warps=4)


def combine_send_chunks(num_max_tokens: int, words: int) -> int:
    """Programs per (expert, source) of the combine send: about one per 32 rows it may hold, each
    at least 512 words of a row."""
    return max(1, min(triton.cdiv(num_max_tokens, 32), triton.cdiv(words, 512)))


@triton.jit
def mul_rn(a, b, INTERPRET: tl.constexpr):
    """a * b rounded on its own: ``mul.rn`` is never fused into an FMA with the following add, so
    the sum matches torch's separate multiply and add bit for bit."""
    if INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def to_bf16(v, INTERPRET: tl.constexpr):
    """float32 -> bf16 rounded to nearest even, as torch; the interpreter's own cast truncates."""
    if INTERPRET:
        bits = v.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(tl.bfloat16)


# ------------------------------------------------------------------------------------------- receive
# Program (t, c) (token t of this rank, channels [c * BLOCK, (c + 1) * BLOCK)), once every source's
# flags[0, :] and the flags of the experts in topk_idx[t] reached this call's epoch:
#   out[t] = bf16(acc), acc = 0; for k in 0..K-1 with topk_idx[t, k] >= 0:
#   acc = acc + w[t, k] * float(row[t, k])   (float32, each product rounded, slot order)
@triton.jit
def low_latency_combine_receive_kernel(
        topk_ptr, weights_ptr, out_ptr, num_tokens, ptrs, epochs_ptr, parity, half_base, call_params, params_off,
        flags_off, recv_off, rank, max_wait, error_addr, op,
        E_LOC: tl.constexpr, NUM_RANKS: tl.constexpr, K: tl.constexpr, H: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_W: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1)
    epoch = finish_call(epochs_ptr, parity)
    # Even a rank without tokens waits for every source: a source signals this call only after it
    # finished receiving the previous one, so this rank's next send cannot overwrite what a peer
    # still reads. Lanes [0, R): flags[0, :]; lanes [BLOCK_R, BLOCK_R + K): token t's experts.
    local_base = tl.load(ptrs + rank) + half_base
    lane = tl.arange(0, BLOCK_W)
    slot = lane - BLOCK_R
    ids = tl.load(topk_ptr + t * K + slot, mask=(slot >= 0) & (slot < K) & (t < num_tokens), other=-1)
    valid = ids >= 0
    owner = tl.where(valid, ids // E_LOC, 0)
    source = lane < BLOCK_R
    flag_index = tl.where(source, lane, (ids - owner * E_LOC) * NUM_RANKS + owner)
    wait_mask = (lane < NUM_RANKS) | valid
    error = error_pointer(error_addr)
    values = wait_call(local_base, flags_off, flag_index, wait_mask, tl.where(source, lane, owner), epoch, max_wait,
                       error, op, rank, INTERPRET)
    # Rows are 16-byte aligned (2 * H is a multiple of 16): wide loads.
    rows = tl.multiple_of((local_base + recv_off + t.to(tl.int64) * (K * 2 * H)).to(tl.pointer_type(tl.bfloat16)), 16)
    h = c * BLOCK + tl.arange(0, BLOCK)
    live = (h < H) & (t < num_tokens)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        used = tl.load(topk_ptr + t * K + k, mask=t < num_tokens, other=-1) >= 0
        w = tl.load(weights_ptr + t * K + k, mask=t < num_tokens, other=0.0)
        v = tl.load(rows + k * H + h, mask=live & used, other=0.0, cache_modifier=".cg")
        acc = tl.where(used, acc + mul_rn(w, v.to(tl.float32), INTERPRET), acc)
    if check_call(local_base, params_off, call_params, values, flag_index, wait_mask, epoch, error, op, rank,
                  NUM_RANKS, BLOCK_R):
        tl.store(out_ptr + t.to(tl.int64) * H + h, to_bf16(acc, INTERPRET), mask=live)


def launch_combine_receive(topk_idx: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor, ptrs: torch.Tensor,
                           epochs: torch.Tensor, parity: int, half_base: int, call_params: int, offsets: dict[str, int],
                           rank: int, num_ranks: int, e_loc: int, max_wait: int, error_addr: int, op: int,
                           interpret: bool) -> None:
    """Writes ``out`` bf16 [N, H] (contiguous): each token's weighted sum of its returned rows."""
    n, hidden = out.shape
    k = topk_idx.shape[1]
    span = combine_receive_span(n, hidden)
    block_r = next_pow2(num_ranks)
    low_latency_combine_receive_kernel[(max(n, 1), triton.cdiv(hidden, span))](
        topk_idx, topk_weights, out, n, ptrs, epochs, parity, half_base, call_params, offsets["params"], offsets["flags"],
        offsets["recv"], rank, max_wait, error_addr, op, E_LOC=e_loc, NUM_RANKS=num_ranks, K=k, H=hidden,
        BLOCK_R=block_r, BLOCK_W=next_pow2(block_r + k), BLOCK=span, INTERPRET=interpret,
        num_warps=max(1, min(4, span // 256)))


def combine_receive_span(num_tokens: int, hidden: int) -> int:
    """Channels per program of the combine receive (a power of two): about 256 programs read at
    once, each 256 to 2048 channels (8 per thread). On 2 x H200 at T = 128, H = 7168 (2026-11-22)
    2048 channels gave a 43.7 us combine against 47.4 at 1024 and 66.4 at 512."""
    span = next_pow2(hidden * max(num_tokens, 1) // 256 + 1) // 2  # largest power of two <= H*N/256
    return min(max(256, min(2048, span)), next_pow2(hidden))

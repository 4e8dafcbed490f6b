"""Low-latency combine that sums on the experts' side (a call without the receive hook).

The plain combine (``low_latency_combine``) sends every (token, expert) row back, and the token's
rank sums them. Here the rank that holds the experts sums first: for each source rank s and token
t, one float32 row, the weighted sum of that token's rows computed on this rank. With top-8 over 2
ranks a token has about four experts on each rank, so half the bytes cross NVLink (a float32 row
is two bf16 rows). The experts' side needs the tokens' weights, which only the combine call
brings, so each rank first sends its weights to every peer and the sums wait for them: this is
why the hook's send half, which must never wait for a peer, keeps the plain combine.

Three launches per call:
1. weights: rank s writes its ``topk_weights`` [N, K] into every peer's weights area [R, T, K],
   each weight in one 8-byte word with the call's epoch as a tag (``float bits << 32 | epoch``).
   A word lands whole, so a reader that sees the tag sees the weight: no fence, no flag, and the
   launch waits for nothing (a release flag after the weights took 4.1 us, 2 x H200).
2. sums: program (s, g, c) on rank d covers tokens [g * TOKENS, (g + 1) * TOKENS) of rank s,
   channels [c * SPAN, (c + 1) * SPAN). For each token t, over the top-k slots of t that this rank
   holds (``token_rows``, from the dispatch), once their weights' tags show this call:
       acc = 0; for k in 0..K-1 held here: acc = acc + w_s[t, k] * float(y[row(s, t, k)])
   (float32, each product rounded, slot order); it stores acc into rank s's partial area
   [R, T, H] float32 at (d, t) when any slot is held here, then adds its arrival share to
   ``flags[0, d]`` on s (release). Program (s, 0, 0) first writes ``params[d]`` on s and adds one
   call's worth to ``flags[le, d]`` (le >= 1) there: this protocol counts arrivals on ``flags[0, d]``
   only, and every flag must reach each call's epoch for the next call at this parity.
3. receive: each token's result is the bf16 of the sum of its partial rows in rank order, over
   the ranks that hold one of its experts.

A slot is held here exactly when row ``token_rows[s, t, k]`` of the slabs came from (s, t, k):
that check, from the handle alone, runs before the wait for the weights, and it keeps a combine
whose ``topk_idx`` differs from its dispatch's from reading outside the slabs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.low_latency_combine import mul_rn, to_bf16, combine_receive_span
from moekit.ep.kernels.low_latency_dispatch import (CALL_SHARES, arrival_share, check_call, finish_call, start_call,
                                                   wait_call)
from moekit.ep.kernels.sync import error_pointer, record_timeout

# Channels and tokens one program of the sums covers: at T = 128, H = 7168 and 2 ranks, 896
# programs, each with up to K rows of 4 x 512 channels in flight.
SUM_SPAN = 512
SUM_TOKENS = 4
_TAG = tl.constexpr(0xFFFFFFFF)


# ------------------------------------------------------------------------------------------- weights
# Program d on rank s: word (s, t, k) of rank d's weights area = bits(topk_weights[t, k]) << 32 |
# (epoch & 0xFFFFFFFF), for t < N.
@triton.jit
def low_latency_presum_weights_kernel(weights_ptr, num_tokens, ptrs, epochs_ptr, parity, half_base, weights_off,
                                      rank, T: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    d = tl.program_id(0)
    epoch = start_call(epochs_ptr, parity)
    dst = (tl.load(ptrs + d) + half_base + weights_off).to(tl.pointer_type(tl.int64)) + rank * (T * K)
    i = tl.arange(0, BLOCK)
    for i0 in range(0, num_tokens * K, BLOCK):
        live = i0 + i < num_tokens * K
        bits = tl.load(weights_ptr + i0 + i, mask=live, other=0.0).to(tl.int32, bitcast=True)
        word = (bits.to(tl.int64) << 32) | (epoch & _TAG)
        tl.store(dst + i0 + i, word, mask=live)


# ---------------------------------------------------------------------------------------------- sums
@triton.jit
def low_latency_presum_send_kernel(
        x_ptr, token_rows, src_info, src_rank, src_slot, ptrs, epochs_ptr, parity, half_base, call_params,
        params_off, flags_off, weights_off, partial_off, rank, max_wait, error_addr, op,
        E_LOC: tl.constexpr, NUM_RANKS: tl.constexpr, T: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
        CHUNKS: tl.constexpr, SPAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
        TOKENS: tl.constexpr, BLOCK_E: tl.constexpr, INTERPRET: tl.constexpr):
    s = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.program_id(2)
    epoch = tl.load(epochs_ptr + 2 + parity)
    t = g * TOKENS + tl.arange(0, TOKENS)
    kk = tl.arange(0, BLOCK_K)
    slot = (t < T)[:, None] & (kk < K)[None, :]
    # Which slots this rank holds, and their rows: from the dispatch's handle, before any wait.
    ROWS: tl.constexpr = E_LOC * NUM_RANKS * T
    pair = (s * T + t)[:, None] * K + kk[None, :]
    row = tl.load(token_rows + pair, mask=slot, other=0)
    row = tl.minimum(tl.maximum(row, 0), ROWS - 1).to(tl.int64)
    held = (slot & (tl.load(src_info + row, mask=slot, other=-1) == t[:, None])
            & (tl.load(src_rank + row, mask=slot, other=-1) == s)
            & (tl.load(src_slot + row, mask=slot, other=-1) == kk[None, :]))
    # The held slots' weights, once their tags show this call (unheld ones count as there).
    local_base = tl.load(ptrs + rank) + half_base
    tags = (local_base + weights_off).to(tl.pointer_type(tl.int64)) + pair
    tag = epoch & _TAG
    word = tl.load(tags, mask=held, other=tag, volatile=True)
    if INTERPRET:
        start = 0
    else:
        start = tl.extra.cuda.globaltimer()
    waited = start - start
    while (tl.min(tl.min(((word & _TAG) == tag).to(tl.int32), axis=1), axis=0) == 0) & (waited < max_wait):
        word = tl.load(tags, mask=held, other=tag, volatile=True)
        if INTERPRET:
            waited += 1
        else:
            waited = tl.extra.cuda.globaltimer() - start
    ok = tl.min(tl.min(((word & _TAG) == tag).to(tl.int32), axis=1), axis=0) > 0
    if not ok:
        record_timeout(error_pointer(error_addr), op, rank, s)
    w = (word >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    h = c * SPAN + tl.arange(0, BLOCK)
    live = (tl.arange(0, BLOCK) < SPAN) & (h < H)
    acc = tl.zeros([TOKENS, BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        pick = (kk == k)[None, :]
        held_k = tl.sum(tl.where(pick, held.to(tl.int32), 0), axis=1) > 0
        row_k = tl.sum(tl.where(pick, row, 0), axis=1)
        w_k = tl.sum(tl.where(pick, w, 0.0), axis=1)
        y_k = tl.load(x_ptr + row_k[:, None] * H + h[None, :], mask=held_k[:, None] & live[None, :], other=0.0)
        acc = tl.where(held_k[:, None], acc + mul_rn(w_k[:, None], y_k.to(tl.float32), INTERPRET), acc)
    base = tl.load(ptrs + s) + half_base
    # Partial rows are 16-byte aligned (4 * H is a multiple of 16): wide stores.
    dst = tl.multiple_of((base + partial_off + (rank * T + t).to(tl.int64) * (4 * H)).to(tl.pointer_type(tl.float32)),
                         16)
    any_held = tl.max(held.to(tl.int32), axis=1) > 0
    tl.store(dst[:, None] + h[None, :], acc, mask=(any_held & ok)[:, None] & live[None, :])
    if (g == 0) & (c == 0):
        tl.store((base + params_off + rank * 8).to(tl.pointer_type(tl.int64)), call_params)
        le = 1 + tl.arange(0, BLOCK_E)
        tl.atomic_add((base + flags_off + (le * NUM_RANKS + rank) * 8).to(tl.pointer_type(tl.int64)),
                      tl.full([BLOCK_E], CALL_SHARES, tl.int64), mask=le < E_LOC, sem="relaxed", scope="sys")
    tl.debug_barrier()
    # Release: this program's partial rows (and the words above) land before its share is counted.
    GROUPS: tl.constexpr = (T + TOKENS - 1) // TOKENS
    tl.atomic_add((base + flags_off + rank * 8).to(tl.pointer_type(tl.int64)),
                  arrival_share((g * CHUNKS + c).to(tl.int64), tl.full([], GROUPS * CHUNKS, tl.int64)),
                  sem="release", scope="sys")


# ------------------------------------------------------------------------------------------- receive
# Program (t, c) (token t of this rank, channels [c * BLOCK, (c + 1) * BLOCK)), once every source's
# flags[0, :] reached this call's epoch:
#   out[t] = bf16(acc), acc = 0; for s in 0..R-1 holding one of topk_idx[t]: acc = acc + partial[s, t]
@triton.jit
def low_latency_presum_receive_kernel(
        topk_ptr, out_ptr, num_tokens, ptrs, epochs_ptr, parity, half_base, call_params, params_off, flags_off,
        partial_off, rank, max_wait, error_addr, op, E_LOC: tl.constexpr, NUM_RANKS: tl.constexpr, T: tl.constexpr,
        K: tl.constexpr, H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
        INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1)
    epoch = finish_call(epochs_ptr, parity)
    # Even a rank without tokens waits for every source (see ``low_latency_combine_receive_kernel``).
    local_base = tl.load(ptrs + rank) + half_base
    lane = tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    ids = tl.load(topk_ptr + t * K + kk, mask=(kk < K) & (t < num_tokens), other=-1)
    owner = tl.where(ids >= 0, ids // E_LOC, -1)
    error = error_pointer(error_addr)
    values = wait_call(local_base, flags_off, lane, lane < NUM_RANKS, lane, epoch, max_wait, error, op, rank, INTERPRET)
    h = c * BLOCK + tl.arange(0, BLOCK)
    live = (h < H) & (t < num_tokens)
    # Partial rows are 16-byte aligned (4 * H is a multiple of 16): wide loads.
    rows = tl.multiple_of((local_base + partial_off + t.to(tl.int64) * (4 * H)).to(tl.pointer_type(tl.float32)), 16)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(NUM_RANKS):
        used = tl.max((owner == s).to(tl.int32), axis=0) > 0
        v = tl.load(rows + s * (T * H) + h, mask=live & used, other=0.0, cache_modifier=".cg")
        acc = tl.where(used, acc + v, acc)
    if check_call(local_base, params_off, call_params, values, lane, lane < NUM_RANKS, epoch, error, op, rank,
                  NUM_RANKS, BLOCK_R):
        tl.store(out_ptr + t.to(tl.int64) * H + h, to_bf16(acc, INTERPRET), mask=live)


# ----------------------------------------------------------------------------------------- launchers
def launch_presum_send(x: torch.Tensor, topk_weights: torch.Tensor, handle, ptrs: torch.Tensor, epochs: torch.Tensor,
                       parity: int, half_base: int, call_params: int, offsets: dict[str, int], rank: int,
                       num_ranks: int, max_wait: int, error_addr: int, op: int, interpret: bool) -> None:
    """Sends this rank's ``topk_weights`` float32 [N, K] (contiguous) to every rank, then each
    (source, token)'s weighted sum of the rows of ``x`` bf16 [E_loc, R*T, H] (contiguous) that it
    routed here; ``handle``: the dispatch's ``LowLatencyHandle``."""
    e_loc, rows, hidden = x.shape
    t_max, k = rows // num_ranks, handle.num_topk
    low_latency_presum_weights_kernel[(num_ranks,)](
        topk_weights, topk_weights.shape[0], ptrs, epochs, parity, half_base, offsets["weights"], rank, T=t_max, K=k,
        BLOCK=1024, num_warps=4)
    chunks = triton.cdiv(hidden, SUM_SPAN)
    span = 16 * triton.cdiv(hidden, 16 * chunks)  # 16-channel pieces: 16-byte aligned in bf16 and float32
    chunks = triton.cdiv(hidden, span)
    tokens = min(SUM_TOKENS, next_pow2(t_max))
    low_latency_presum_send_kernel[(num_ranks, triton.cdiv(t_max, tokens), chunks)](
        x, handle.token_rows, handle.src_info, handle.src_rank, handle.src_slot, ptrs, epochs, parity, half_base,
        call_params, offsets["params"], offsets["flags"], offsets["weights"], offsets["recv"], rank, max_wait,
        error_addr, op, E_LOC=e_loc, NUM_RANKS=num_ranks, T=t_max, K=k, H=hidden, CHUNKS=chunks, SPAN=span,
        BLOCK=next_pow2(span), BLOCK_K=next_pow2(k), TOKENS=tokens, BLOCK_E=next_pow2(max(e_loc - 1, 1)),
        INTERPRET=interpret, num_warps=4)


def launch_presum_receive(topk_idx: torch.Tensor, out: torch.Tensor, ptrs: torch.Tensor, epochs: torch.Tensor,
                          parity: int, half_base: int, call_params: int, offsets: dict[str, int], rank: int,
                          num_ranks: int, num_max_tokens: int, e_loc: int, max_wait: int, error_addr: int, op: int,
                          interpret: bool) -> None:
    """Writes ``out`` bf16 [N, H] (contiguous): each token's sum of its partial rows."""
    n, hidden = out.shape
    k = topk_idx.shape[1]
    span = combine_receive_span(n, hidden)
    low_latency_presum_receive_kernel[(max(n, 1), triton.cdiv(hidden, span))](
        topk_idx, out, n, ptrs, epochs, parity, half_base, call_params, offsets["params"], offsets["flags"],
        offsets["recv"], rank, max_wait, error_addr, op, E_LOC=e_loc, NUM_RANKS=num_ranks, T=num_max_tokens, K=k,
        H=hidden, BLOCK_R=next_pow2(num_ranks), BLOCK_K=next_pow2(k), BLOCK=span, INTERPRET=interpret,
        num_warps=max(1, min(4, span // 256)))

"""Low-latency dispatch kernels: the send (with the FP8 cast fused in) and the receive (the hook).

Heap areas of one parity on every rank (offsets from :class:`moekit.ep.triton_low_latency.Layout`):
``params`` int64 [R], ``flags`` int64 [E_loc, R], ``rows`` int64 [E_loc, R] and the receive
area. The receive area holds every source's tokens, each once however many of this rank's
experts chose it: data [R, T, row bytes] and float32 scales [R, T, H/128] (FP8 only); and for
every (local expert, source rank) T message slots naming them: header int32 [E_loc, R, T, 2]
(source token, top-k slot). So a token crosses NVLink once to each rank that holds one of its
experts, and the receive copies it into each of those experts' slabs.

Flag ``flags[le, s]`` on rank d counts the arrivals of rank s's send programs that sent rows of
global expert ``d * E_loc + le`` (or of the one program that stands for that expert when no token
chose it): each adds its share, with release ordering, straight after its own rows, and the
shares of one call add up to exactly ``1 << 32`` (:func:`arrival_share`). So the flag reaches
``epoch << 32`` once every row of the call has landed, with no program waiting for another. The
first of those programs writes the row count into ``rows[le, s]`` before its share; the first of
``flags[0, s]``'s also writes ``params[s]``, the sizes rank s called with, so that the receiver
can refuse a call whose sizes disagree without a host collective.

The epoch of a call lives on the device (CUDA graphs replay the same kernel arguments):
``epochs[0, p]`` counts the calls completed at parity p, the send reads it and publishes the
call's epoch in ``epochs[1, p]``, and the receive copies that back into ``epochs[0, p]``. Every
program writes the same value, so the writes are benign.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.sync import MISMATCH, error_pointer, wait_all

_MISMATCH = tl.constexpr(MISMATCH)


@triton.jit
def _e4m3_bits(v):
    """float32 -> e4m3fn bit pattern (uint8), round to nearest even, as torch's cast; values from
    480 up become NaN (0x7f). The interpreter's own conversion mis-rounds at binade edges."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    # Normal e4m3 (>= 2**-6): round the 23-bit mantissa to 3 bits; a carry bumps the exponent.
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal: multiples of 2**-9, rounded to nearest even by adding and removing 2**23.
    sub = ((tl.abs(v) * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0x3C800000, sub, normal)
    code = tl.where(a >= 0x43F00000, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def fp8_cast_groups(v, ROUND_SCALE: tl.constexpr, INTERPRET: tl.constexpr):
    """[G, 128] float32 -> (e4m3 bits uint8 [G, 128], float32 scales [G]).

    scale = max(amax, 1e-4) / 448 with IEEE division; ``ROUND_SCALE`` rounds it up to a power of
    two (exponent + 1 when any mantissa bit is set: the same as 2**ceil(log2(scale)) for positive
    normal scales); each value is stored as e4m3(v / scale).
    """
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-4)
    scale = tl.math.div_rn(amax, 448.0)
    if ROUND_SCALE:
        bits = scale.to(tl.int32, bitcast=True)
        up = (((bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)) << 23)
        scale = up.to(tl.float32, bitcast=True)
    q = tl.math.div_rn(v, scale[:, None])
    if INTERPRET:
        data = _e4m3_bits(q)
    else:
        data = q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return data, scale


# What one call's arrivals on a flag add up to: the flag's value after the call with epoch p is
# p << 32, and before its last arrival less than that.
CALL_SHARES = tl.constexpr(1 << 32)


@triton.jit
def arrival_share(index, count):
    """The share that arrival ``index`` of ``count`` (int64 tensors, count >= 1) adds to a flag: the
    shares of all ``count`` arrivals add up to exactly one call's worth (``1 << 32``), whatever their
    order."""
    return CALL_SHARES // count + tl.where(index == 0, CALL_SHARES % count, 0)


@triton.jit
def start_call(epochs_ptr, parity):
    """The epoch of a call starting at ``parity`` (one past that parity's last completed call), now
    published as the call in flight there: what a call's first launch does (every program writes
    the same value)."""
    epoch = tl.load(epochs_ptr + parity) + 1
    tl.store(epochs_ptr + 2 + parity, epoch)
    return epoch


@triton.jit
def finish_call(epochs_ptr, parity):
    """The epoch of the call in flight at ``parity``, now recorded as that parity's last completed
    call: what a receive, the call's last launch, does first (every program writes the same value)."""
    epoch = tl.load(epochs_ptr + 2 + parity)
    tl.store(epochs_ptr + parity, epoch)
    return epoch


@triton.jit
def wait_call(local_base, flags_off, flag_index, wait_mask, peers, epoch, max_wait, error, op, rank,
              INTERPRET: tl.constexpr):
    """Waits until the flags ``flags[flag_index]`` under ``wait_mask`` reached this call's ``epoch``
    (all in one spin); returns their values for :func:`check_call`. The waits must include every
    source's ``flags[0, s]``, index s, whose first arrival wrote ``params[s]`` before its share.
    A receive loads what the flags announce before :func:`check_call`, so that those loads and the
    check's are in flight together, and uses the values only if the check passes."""
    flags = (local_base + flags_off).to(tl.pointer_type(tl.int64))
    values = wait_all(flags + tl.where(wait_mask, flag_index, 0), wait_mask, epoch << 32, peers, max_wait, error, op,
                      rank, INTERPRET, LOAD=True)
    tl.debug_barrier()
    return values


@triton.jit
def check_call(local_base, params_off, call_params, values, flag_index, wait_mask, epoch, error, op, rank,
               NUM_RANKS: tl.constexpr, BLOCK_R: tl.constexpr):
    """After :func:`wait_call` returned ``values``: whether every flag arrived and every source sent
    the same ``call_params`` (op and sizes) as this rank's call.

    On a disagreement records ``[MISMATCH, op, rank, first such source]`` at ``error``, over a
    timeout that it may have caused (a peer with other sizes may never set some flags).
    """
    target = epoch << 32
    src = tl.arange(0, BLOCK_R)
    live = src < NUM_RANKS
    # Indices below R are the flags[0, :], complete only after params was written.
    sources_in = tl.min(tl.where((flag_index < NUM_RANKS) & wait_mask, values, target), axis=0) >= target
    got = tl.load((local_base + params_off).to(tl.pointer_type(tl.int64)) + src, mask=live, other=call_params,
                  volatile=True)
    bad = (got != call_params).to(tl.int32)
    if sources_in & (tl.max(bad, axis=0) > 0):
        tl.atomic_xchg(error + 1, op)
        tl.atomic_xchg(error + 2, rank)
        tl.atomic_xchg(error + 3, tl.min(tl.where(bad > 0, src, NUM_RANKS), axis=0))
        tl.atomic_xchg(error, _MISMATCH)
    return (tl.min(values, axis=0) >= target) & (tl.max(bad, axis=0) == 0)


# ---------------------------------------------------------------------------------------------- send
@triton.jit
def _scan_step(topk_ptr, start, num_tokens, t, wanted, experts, counts, count_experts, K: tl.constexpr,
               BLOCK_TOKENS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Adds tokens [start, start + BLOCK_TOKENS)'s choices: to ``counts`` (per this token's slot),
    0x10001 for each earlier token that chose the slot's expert and 1 for each later one (or this);
    to ``count_experts``, 1 for each token that chose each of ``experts``."""
    kk = tl.arange(0, BLOCK_K)
    tok = start + tl.arange(0, BLOCK_TOKENS)
    chosen = tl.load(topk_ptr + tok[:, None] * K + kk[None, :], mask=(tok[:, None] < num_tokens) & (kk[None, :] < K),
                     other=-1).to(tl.int32)[:, :, None]
    hit = tl.where(chosen == wanted[None, None, :], tl.where(tok[:, None, None] < t, 0x10001, 1), 0)
    counts += tl.sum(tl.sum(hit, axis=0), axis=0)
    count_experts += tl.sum(tl.sum((chosen == experts[None, None, :]).to(tl.int32), axis=0), axis=0)
    return counts, count_experts


# Program (t, c) on rank s: channels [c * SPAN, (c + 1) * SPAN) of token t (t < N). For each top-k
# slot k with e = topk_idx[t, k] >= 0 (owner d = e // E_loc, le = e % E_loc), message slot i =
# #{t' < t : e in topk_idx[t']} (token order) of (le, s) on d gets header (t, k); the first such
# slot k of each owner d writes token row (s, t) on d: data = x[t] (bf16) or e4m3(x[t] / scale)
# with scale per 128 channels (cast once for all k), and scales.
# Then it adds arrival_share(i * C + c, count_e * C) to flags[le, s] on d (count_e = #{t : e in
# topk_idx[t]}, C chunks per token); arrival 0 first writes rows[le, s] = count_e. Experts with
# count_e = 0: program q = t * C + c stands for experts q * EPP .. q * EPP + EPP - 1 that no token
# chose, writes their rows word 0 and adds a whole call's share.
@triton.jit
def low_latency_dispatch_send_kernel(
        x_ptr, topk_ptr, num_tokens, ptrs, epochs_ptr, parity, half_base, call_params, params_off, flags_off,
        rows_off, data_off, header_off, scales_off, rank,
        E_LOC: tl.constexpr, NUM_RANKS: tl.constexpr, T: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
        CHUNKS: tl.constexpr, SPAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_TOKENS: tl.constexpr, EPP: tl.constexpr, BLOCK_EPP: tl.constexpr, USE_FP8: tl.constexpr,
        ROUND_SCALE: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1)
    start_call(epochs_ptr, parity)
    E: tl.constexpr = E_LOC * NUM_RANKS
    kk = tl.arange(0, BLOCK_K)
    ids = tl.load(topk_ptr + t * K + kk, mask=(kk < K) & (t < num_tokens), other=-1)
    valid = ids >= 0
    q = t * CHUNKS + c
    ee = q * EPP + tl.arange(0, BLOCK_EPP)
    mine = (tl.arange(0, BLOCK_EPP) < EPP) & (ee < E)
    dest = tl.where(valid, ids // E_LOC, 0)
    le = tl.where(valid, ids % E_LOC, 0)
    # What needs only the ids (the peers' heap addresses, the token's channels) comes before the scan.
    base = tl.load(ptrs + dest) + half_base
    base_mine = tl.load(ptrs + tl.where(mine, ee // E_LOC, 0)) + half_base
    src = x_ptr + t.to(tl.int64) * H
    if USE_FP8:
        G: tl.constexpr = H // 128
        SPAN_G: tl.constexpr = SPAN // 128
        g = tl.arange(0, BLOCK // 128)
        group = c * SPAN_G + g
        live = (g < SPAN_G) & (group < G) & (t < num_tokens)
        offs = group[:, None] * 128 + tl.arange(0, 128)[None, :]
        v = tl.load(src + offs, mask=live[:, None], other=0.0)
    else:
        h = c * SPAN + tl.arange(0, BLOCK)
        live = (tl.arange(0, BLOCK) < SPAN) & (h < H)
        v = tl.load(src + h, mask=live & (t < num_tokens))

    # The token's row goes once to each owner: from the first slot naming it. Its place there needs
    # no scan, so it is stored first and crosses NVLink while the scan runs (its registers are then
    # free for the scan's).
    same_dest = (kk[None, :] < kk[:, None]) & valid[None, :] & (dest[None, :] == dest[:, None])
    first_to_dest = valid & (tl.sum(same_dest.to(tl.int32), axis=1) == 0)
    token_row = (rank * T + t).to(tl.int64)
    ROW_BYTES: tl.constexpr = H if USE_FP8 else 2 * H
    # Rows start 16-byte aligned (row bytes are a multiple of 16): wide stores.
    data = base + data_off + token_row * ROW_BYTES
    if USE_FP8:
        fp8, scale = fp8_cast_groups(v.to(tl.float32), ROUND_SCALE, INTERPRET)
        dst = tl.multiple_of(data.to(tl.pointer_type(tl.uint8)), 16)
        tl.store(dst[:, None, None] + offs[None, :, :], fp8[None, :, :],
                 mask=first_to_dest[:, None, None] & live[None, :, None])
        scales = (base + scales_off + token_row * (G * 4)).to(tl.pointer_type(tl.float32))
        tl.store(scales[:, None] + group[None, :], scale[None, :], mask=first_to_dest[:, None] & live[None, :])
    else:
        dst = tl.multiple_of(data.to(tl.pointer_type(tl.bfloat16)), 16)
        tl.store(dst[:, None] + h[None, :], v[None, :], mask=first_to_dest[:, None] & live[None, :])

    # How many earlier (high 16 bits) and all (low 16 bits; at most T < 2**16) tokens chose each of
    # this token's experts, and all tokens each of this program's designated experts. Two steps or
    # fewer are unrolled (T is a compile-time bound), so that their loads are in flight together;
    # more would hold too many registers for four programs per SM.
    wanted = ids.to(tl.int32)
    counts = tl.zeros([BLOCK_K], dtype=tl.int32)
    count_mine = tl.zeros([BLOCK_EPP], dtype=tl.int32)
    if T <= 2 * BLOCK_TOKENS:
        for start in tl.static_range(0, T, BLOCK_TOKENS):
            counts, count_mine = _scan_step(topk_ptr, start, num_tokens, t, wanted, ee, counts, count_mine, K,
                                            BLOCK_TOKENS, BLOCK_K)
    else:
        for start in range(0, num_tokens, BLOCK_TOKENS):
            counts, count_mine = _scan_step(topk_ptr, start, num_tokens, t, wanted, ee, counts, count_mine, K,
                                            BLOCK_TOKENS, BLOCK_K)
    count = counts & 0xFFFF
    before = (counts >> 16) & 0xFFFF

    row = (le * NUM_RANKS + rank) * T + tl.where(valid, before, 0)  # int64: message slot on dest
    two = tl.arange(0, 2)
    header = (base + header_off + row * 8).to(tl.pointer_type(tl.int32))
    tl.store(header[:, None] + two[None, :], tl.where(two[None, :] == 0, t, kk[:, None]),
             mask=valid[:, None] & (c == 0))
    arrival = before.to(tl.int64) * CHUNKS + c
    first = valid & (arrival == 0)
    empty = mine & (count_mine == 0)
    le_mine = ee % E_LOC
    word = (le * NUM_RANKS + rank) * 8
    word_mine = (le_mine * NUM_RANKS + rank) * 8
    tl.store((base + rows_off + word).to(tl.pointer_type(tl.int64)), count.to(tl.int64), mask=first)
    tl.store((base_mine + rows_off + word_mine).to(tl.pointer_type(tl.int64)), tl.zeros([BLOCK_EPP], dtype=tl.int64),
             mask=empty)
    tl.store((base + params_off + rank * 8).to(tl.pointer_type(tl.int64)), call_params, mask=first & (le == 0))
    tl.store((base_mine + params_off + rank * 8).to(tl.pointer_type(tl.int64)), call_params,
             mask=empty & (le_mine == 0))
    tl.debug_barrier()
    # Release: this program's rows (and the words above) land before its share is counted.
    tl.atomic_add((base + flags_off + word).to(tl.pointer_type(tl.int64)),
                  arrival_share(arrival, tl.maximum(count, 1).to(tl.int64) * CHUNKS), mask=valid, sem="release",
                  scope="sys")
    tl.atomic_add((base_mine + flags_off + word_mine).to(tl.pointer_type(tl.int64)),
                  tl.full([BLOCK_EPP], CALL_SHARES, tl.int64), mask=empty, sem="release", scope="sys")


# Elements of one step of the send's scan of the top-k ids (tokens x K x experts compared), and
# words of one step of the receive's and the combine send's copies (rows x words). A scan step of
# 8192 took 197 registers per thread at T = 128 (FP8, H 7168), so only two programs fit on an SM
# and the 512 ran in two waves: 17.0 us against 13.0 with 4096 (116 registers), 2 x H200.
SCAN_BLOCK = 4096
TILE = 4096


def send_chunks(num_max_tokens: int, hidden: int) -> int:
    """Programs per token of the dispatch send: enough that about 512 programs share the work
    (small T: more SMs per token), each at least one 128-channel group."""
    return max(1, min(triton.cdiv(512, num_max_tokens), triton.cdiv(hidden, 128)))


def launch_dispatch_send(x: torch.Tensor, topk_idx: torch.Tensor, ptrs: torch.Tensor, epochs: torch.Tensor, parity: int,
                         half_base: int, call_params: int, offsets: dict[str, int], rank: int, num_ranks: int,
                         num_max_tokens: int, num_experts: int, use_fp8: bool, round_scale: bool,
                         interpret: bool) -> None:
    """Sends every (token, expert) pair of ``x`` bf16 [N, H] routed by ``topk_idx`` int64 [N, K]."""
    n, hidden = x.shape
    k = topk_idx.shape[1]
    chunks = send_chunks(num_max_tokens, hidden)
    span = 128 * triton.cdiv(triton.cdiv(hidden, 128), chunks)
    chunks = triton.cdiv(hidden, span)
    programs = num_max_tokens * chunks
    epp = triton.cdiv(num_experts, programs)
    block_k, block_epp = next_pow2(k), next_pow2(epp)
    block_tokens = max(1, min(next_pow2(num_max_tokens), SCAN_BLOCK // (block_k * max(block_k, block_epp))))
    low_latency_dispatch_send_kernel[(num_max_tokens, chunks)](
        x, topk_idx, n, ptrs, epochs, parity, half_base, call_params, offsets["params"], offsets["flags"],
        offsets["rows"], offsets["data"], offsets["header"], offsets["scales"], rank,
        E_LOC=num_experts // num_ranks, NUM_RANKS=num_ranks, T=num_max_tokens, K=k, H=hidden, CHUNKS=chunks,
        SPAN=span, BLOCK=next_pow2(span), BLOCK_K=block_k, BLOCK_TOKENS=block_tokens, EPP=epp,
        BLOCK_EPP=block_epp, USE_FP8=use_fp8, ROUND_SCALE=round_scale, INTERPRET=interpret, num_warps=4)


# ------------------------------------------------------------------------------------------- receive
# Program (le, s, c) on rank d, after flags[0, :] and flags[le, :] reached this call's epoch:
#   n_s = rows[le, s], begin = sum(n_{s'} for s' < s); slab rows begin + j (j < n_s) of
#   expert le = token row (s, header token) of message slot (le, s, j): data words
#   [c * TILE_WORDS, (c + 1) * TILE_WORDS), and (c = 0) scales (UE8M0: exponent bytes, four per
#   int32), src_info = header token, src_rank = s,
#   src_slot = header slot, token_rows[s, token, slot] = the slab row (le * R*T + begin + j),
#   layout_range[le, s] = (begin << 32) | n_s. Program (le, R - 1, 0)
#   writes recv_count[le] = sum(n), adds it to the stats and marks the unused rows' src_info /
#   src_rank / src_slot with -1.
@triton.jit
def low_latency_dispatch_receive_kernel(
        ptrs, epochs_ptr, parity, half_base, call_params, params_off, flags_off, rows_off, data_off, header_off,
        scales_off, rank, max_wait, error_addr, op,
        out_data, out_scales, src_info, src_rank, src_slot, token_rows, layout_range, recv_count, stats,
        E_LOC: tl.constexpr, NUM_RANKS: tl.constexpr, T: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_ROWS: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_WORDS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        USE_FP8: tl.constexpr, USE_UE8M0: tl.constexpr, HAS_STATS: tl.constexpr, INTERPRET: tl.constexpr):
    le = tl.program_id(0)
    s = tl.program_id(1)
    c = tl.program_id(2)
    epoch = finish_call(epochs_ptr, parity)
    local_base = tl.load(ptrs + rank) + half_base
    error = error_pointer(error_addr)
    # Lanes [0, R): flags[0, :]; lanes [BLOCK_R, BLOCK_R + R): flags[le, :].
    lane = tl.arange(0, 2 * BLOCK_R)
    src = lane % BLOCK_R
    mine = lane >= BLOCK_R
    flag_index = tl.where(mine, le * NUM_RANKS, 0) + src
    values = wait_call(local_base, flags_off, flag_index, src < NUM_RANKS, src, epoch, max_wait, error, op, rank,
                       INTERPRET)
    slot0 = ((le * NUM_RANKS + s) * T).to(tl.int64)
    header = (local_base + header_off).to(tl.pointer_type(tl.int32)) + slot0 * 2
    r = tl.arange(0, TILE_ROWS)
    # The first tile's tokens and the row counts (those past the count are not used).
    token = tl.load(header + r * 2, mask=r < T, other=0, cache_modifier=".cg")
    rows = tl.load((local_base + rows_off).to(tl.pointer_type(tl.int64)) + le * NUM_RANKS + src,
                   mask=mine & (src < NUM_RANKS), other=0, volatile=True)
    ok = check_call(local_base, params_off, call_params, values, flag_index, src < NUM_RANKS, epoch, error, op, rank,
                    NUM_RANKS, BLOCK_R)
    if ok:
        begin = tl.sum(tl.where(src < s, rows, 0), axis=0)
        n = tl.sum(tl.where(src == s, rows, 0), axis=0)
        RT: tl.constexpr = NUM_RANKS * T
        G: tl.constexpr = H // 128
        ROW_WORDS: tl.constexpr = (H if USE_FP8 else 2 * H) // 4
        out_row0 = le.to(tl.int64) * RT + begin
        token0 = (s * T).to(tl.int64)
        # Rows are 16-byte aligned (row bytes are a multiple of 16): wide loads and stores.
        data = tl.multiple_of((local_base + data_off + token0 * (4 * ROW_WORDS)).to(tl.pointer_type(tl.int32)), 16)
        scales = (local_base + scales_off).to(tl.pointer_type(tl.int32)) + token0 * G
        words = out_data.to(tl.pointer_type(tl.int32), bitcast=True) + out_row0 * ROW_WORDS
        w = c * TILE_WORDS + tl.arange(0, TILE_WORDS)
        for j0 in range(0, n, TILE_ROWS):
            j = j0 + r
            got = j < n
            if j0 > 0:
                token = tl.load(header + j * 2, mask=got, other=0, cache_modifier=".cg")
            inside = got[:, None] & (w < ROW_WORDS)[None, :]
            from_row = token[:, None] * ROW_WORDS + w[None, :]
            tl.store(words + j[:, None] * ROW_WORDS + w[None, :], tl.load(data + from_row, mask=inside, cache_modifier=".cg"),
                     mask=inside)
            if USE_FP8:
                scaled = got & (c == 0)  # one program of the row copies its scales
                if USE_UE8M0:
                    W: tl.constexpr = G // 4
                    q = tl.arange(0, BLOCK_G // 4)
                    b = tl.arange(0, 4)
                    bits = tl.load(scales + token[:, None, None] * G + q[None, :, None] * 4 + b[None, None, :],
                                   mask=scaled[:, None, None] & (q < W)[None, :, None], other=0, cache_modifier=".cg")
                    packed = tl.sum(((bits >> 23) & 0xFF) << (b[None, None, :] * 8), axis=2)
                    tl.store(out_scales + le.to(tl.int64) * W * RT + q[None, :] * RT + begin + j[:, None], packed,
                             mask=scaled[:, None] & (q < W)[None, :])
                else:
                    g = tl.arange(0, BLOCK_G)
                    f = tl.load((scales + token[:, None] * G + g[None, :]).to(tl.pointer_type(tl.float32)),
                                mask=scaled[:, None] & (g < G)[None, :], cache_modifier=".cg")
                    tl.store(out_scales + le.to(tl.int64) * G * RT + g[None, :] * RT + begin + j[:, None], f,
                             mask=scaled[:, None] & (g < G)[None, :])
        if c == 0:
            slot = tl.arange(0, BLOCK_ROWS)
            present = slot < n
            hdr = tl.load(header + slot[:, None] * 2 + tl.arange(0, 2)[None, :], mask=present[:, None], other=0,
                          cache_modifier=".cg")
            tok = tl.sum(tl.where(tl.arange(0, 2)[None, :] == 0, hdr, 0), axis=1)
            k = tl.sum(tl.where(tl.arange(0, 2)[None, :] == 1, hdr, 0), axis=1)
            tl.store(src_info + out_row0 + slot, tok, mask=present)
            tl.store(src_rank + out_row0 + slot, tl.zeros_like(slot).to(tl.int64) + s, mask=present)
            tl.store(src_slot + out_row0 + slot, k.to(tl.int64), mask=present)
            tl.store(token_rows + (s * T + tok) * K + k, (out_row0 + slot).to(tl.int32), mask=present)
            tl.store(layout_range + le * NUM_RANKS + s, (begin.to(tl.int64) << 32) | n.to(tl.int64))
            if s == NUM_RANKS - 1:
                total = begin + n
                tl.store(recv_count + le, total.to(tl.int32))
                if HAS_STATS:
                    tl.store(stats + le, tl.load(stats + le) + total.to(tl.int32))
                for start in range(0, RT, BLOCK_ROWS):
                    idx = start + slot
                    unused = (idx >= total) & (idx < RT)
                    tl.store(src_info + le.to(tl.int64) * RT + idx, tl.full([BLOCK_ROWS], -1, tl.int32), mask=unused)
                    tl.store(src_rank + le.to(tl.int64) * RT + idx, tl.full([BLOCK_ROWS], -1, tl.int64), mask=unused)
                    tl.store(src_slot + le.to(tl.int64) * RT + idx, tl.full([BLOCK_ROWS], -1, tl.int64), mask=unused)


def launch_dispatch_receive(ptrs: torch.Tensor, epochs: torch.Tensor, parity: int, half_base: int, call_params: int,
                            offsets: dict[str, int], rank: int, num_ranks: int, num_max_tokens: int, hidden: int,
                            e_loc: int, max_wait: int, error_addr: int, op: int, out_data: torch.Tensor,
                            out_scales: torch.Tensor | None, src_info: torch.Tensor, src_rank: torch.Tensor,
                            src_slot: torch.Tensor, token_rows: torch.Tensor, layout_range: torch.Tensor,
                            recv_count: torch.Tensor, stats: torch.Tensor | None, use_fp8: bool, use_ue8m0: bool,
                            interpret: bool) -> None:
    """Fills the receive outputs (shapes as in ``TorchLowLatency.dispatch``) from this rank's heap."""
    row_words = (hidden if use_fp8 else 2 * hidden) // 4
    tile_words = min(next_pow2(row_words), 1024)  # one program per 1024 words of a row
    low_latency_dispatch_receive_kernel[(e_loc, num_ranks, triton.cdiv(row_words, tile_words))](
        ptrs, epochs, parity, half_base, call_params, offsets["params"], offsets["flags"], offsets["rows"],
        offsets["data"], offsets["header"], offsets["scales"], rank, max_wait, error_addr, op,
        out_data, out_scales if out_scales is not None else out_data, src_info, src_rank, src_slot, token_rows,
        layout_range, recv_count, stats if stats is not None else recv_count,
        E_LOC=e_loc, NUM_RANKS=num_ranks, T=num_max_tokens, K=token_rows.shape[2], H=hidden,
        BLOCK_R=next_pow2(num_ranks), BLOCK_ROWS=next_pow2(num_max_tokens), TILE_ROWS=max(1, TILE // tile_words),
        TILE_WORDS=tile_words, BLOCK_G=next_pow2(max(hidden // 128, 4)), USE_FP8=use_fp8,
        USE_UE8M0=use_ue8m0, HAS_STATS=stats is not None, INTERPRET=interpret, num_warps=4)

"""Low-latency dispatch kernels: the send (with the FP8 cast fused in) and the receive (the hook).

Heap areas of one parity on every rank (offsets from :class:`moekit.ep.triton_low_latency.Layout`):
``params`` int64 [R], ``flags`` int64 [E_loc, R], and the receive area, which holds for every
(local expert, source rank) T message slots: data [E_loc, R, T, row bytes], header int32
[E_loc, R, T, 2] (source token, top-k slot) and float32 scales [E_loc, R, T, H/128] (FP8 only).

Flag ``flags[le, s]`` on rank d has one writer: rank s's send program for global expert
``d * E_loc + le``; it holds ``(epoch << 32) | rows`` once those rows have landed. Program
``le = 0`` also writes ``params[s]``, the sizes rank s called with, before its flag, so that the
receiver can refuse a call whose sizes disagree without a host collective.

The epoch of a call lives on the device (CUDA graphs replay the same kernel arguments):
``epochs[0, p]`` counts the calls completed at parity p, the send reads it and publishes the
call's epoch in ``epochs[1, p]``, and the receive copies that back into ``epochs[0, p]``. Every
program writes the same value, so the writes are benign.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.sync import MISMATCH, error_pointer, peer_pointer, poll, signal, wait_all_geq

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


@triton.jit
def wait_sources(local_base, flags_off, params_off, call_params, epoch, max_wait, error, op, rank,
                 NUM_RANKS: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    """Waits until every source s has set ``flags[0, s]`` to this call's ``epoch`` and checks that it
    sent the same ``call_params`` (op and sizes) as this rank's call. Returns whether all is well.

    On a disagreement records ``[MISMATCH, op, rank, first such source]`` at ``error``.
    """
    src = tl.arange(0, BLOCK_R)
    live = src < NUM_RANKS
    flags = (local_base + flags_off).to(tl.pointer_type(tl.int64))
    ok = wait_all_geq(flags + tl.where(live, src, 0), live, epoch << 32, src, max_wait, error, op, rank, INTERPRET)
    tl.debug_barrier()
    got = tl.load((local_base + params_off).to(tl.pointer_type(tl.int64)) + src, mask=live, other=call_params,
                  volatile=True)
    bad = (got != call_params).to(tl.int32)
    if ok & (tl.max(bad, axis=0) > 0):
        tl.atomic_xchg(error + 1, op)
        tl.atomic_xchg(error + 2, rank)
        tl.atomic_xchg(error + 3, tl.min(tl.where(bad > 0, src, NUM_RANKS), axis=0))
        tl.atomic_xchg(error, _MISMATCH)
    return ok & (tl.max(bad, axis=0) == 0)


# ---------------------------------------------------------------------------------------------- send
# Program e (one per global expert, owner d = e // E_loc, le = e % E_loc) on rank s:
#   rows_e = [t : e in topk_idx[t]] in token order; row i of them goes to slot (le, s, i) of d's
#   receive area: data = x[t] (bf16) or e4m3(x[t] / scale) with scale per 128 channels, header
#   (t, k) with topk_idx[t, k] = e, scales. Then flags[le, s] on d = (epoch << 32) | len(rows_e).
@triton.jit
def low_latency_dispatch_send_kernel(
        x_ptr, topk_ptr, num_tokens, ptrs, epochs_ptr, parity, half_base, call_params, params_off, flags_off,
        data_off, header_off, scales_off, rank,
        E_LOC: tl.constexpr, NUM_RANKS: tl.constexpr, T: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, USE_FP8: tl.constexpr,
        ROUND_SCALE: tl.constexpr, INTERPRET: tl.constexpr):
    e = tl.program_id(0)
    dest = e // E_LOC
    le = e % E_LOC
    epoch = tl.load(epochs_ptr + parity) + 1
    tl.store(epochs_ptr + 2 + parity, epoch)

    t = tl.arange(0, BLOCK_T)
    kk = tl.arange(0, BLOCK_K)
    ids = tl.load(topk_ptr + t[:, None] * K + kk[None, :], mask=(t[:, None] < num_tokens) & (kk[None, :] < K),
                  other=-1)
    hit = ids == e
    has = tl.sum(hit.to(tl.int32), axis=1)
    slot = tl.sum(tl.where(hit, kk[None, :], 0), axis=1)
    pos = tl.cumsum(has, axis=0) - has
    count = tl.sum(has, axis=0)

    slot0 = ((le * NUM_RANKS + rank) * T).to(tl.int64)  # this (expert, source) pair's first message slot
    ROW_BYTES: tl.constexpr = H if USE_FP8 else 2 * H
    G: tl.constexpr = H // 128
    for i in range(count):
        sel = (has > 0) & (pos == i)
        tok = tl.sum(tl.where(sel, t, 0), axis=0)
        k = tl.sum(tl.where(sel, slot, 0), axis=0)
        row = slot0 + i
        header = peer_pointer(ptrs, dest, half_base + header_off + row * 8, tl.int32)
        tl.store(header + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, tok, k))
        src = x_ptr + tok.to(tl.int64) * H
        data = peer_pointer(ptrs, dest, half_base + data_off + row * ROW_BYTES, tl.uint8)
        if USE_FP8:
            scales = peer_pointer(ptrs, dest, half_base + scales_off + row * (G * 4), tl.float32)
            GROUPS: tl.constexpr = CHUNK // 128
            g = tl.arange(0, GROUPS)
            c = tl.arange(0, 128)
            for start in range(0, G, GROUPS):
                live = (start + g) < G
                offs = (start + g)[:, None] * 128 + c[None, :]
                v = tl.load(src + offs, mask=live[:, None], other=0.0).to(tl.float32)
                q, scale = fp8_cast_groups(v, ROUND_SCALE, INTERPRET)
                tl.store(data + offs, q, mask=live[:, None])
                tl.store(scales + start + g, scale, mask=live)
        else:
            words = data.to(tl.pointer_type(tl.bfloat16))
            c = tl.arange(0, CHUNK)
            for start in range(0, H, CHUNK):
                live = start + c < H
                tl.store(words + start + c, tl.load(src + start + c, mask=live), mask=live)
    if le == 0:
        tl.store(peer_pointer(ptrs, dest, half_base + params_off + rank * 8, tl.int64), call_params)
    tl.debug_barrier()
    signal(peer_pointer(ptrs, dest, half_base + flags_off + (le * NUM_RANKS + rank) * 8, tl.int64),
           (epoch << 32) | count.to(tl.int64))


def launch_dispatch_send(x: torch.Tensor, topk_idx: torch.Tensor, ptrs: torch.Tensor, epochs: torch.Tensor,
                         parity: int, half_base: int, call_params: int, offsets: dict[str, int], rank: int, num_ranks: int,
                         num_max_tokens: int, num_experts: int, use_fp8: bool, round_scale: bool,
                         interpret: bool) -> None:
    """Sends every (token, expert) pair of ``x`` bf16 [N, H] routed by ``topk_idx`` int64 [N, K]."""
    n, hidden = x.shape
    k = topk_idx.shape[1]
    chunk = min(triton.next_power_of_2(hidden), 2048)
    low_latency_dispatch_send_kernel[(num_experts,)](
        x, topk_idx, n, ptrs, epochs, parity, half_base, call_params, offsets["params"], offsets["flags"],
        offsets["data"], offsets["header"], offsets["scales"], rank,
        E_LOC=num_experts // num_ranks, NUM_RANKS=num_ranks, T=num_max_tokens, K=k, H=hidden,
        BLOCK_T=triton.next_power_of_2(num_max_tokens), BLOCK_K=triton.next_power_of_2(k), CHUNK=chunk,
        USE_FP8=use_fp8, ROUND_SCALE=round_scale, INTERPRET=interpret, num_warps=4)


# ------------------------------------------------------------------------------------------- receive
# Program (le, s) on rank d, after flags[0, :] and flags[le, :] reached this call's epoch:
#   n_s = rows from source s, begin = sum(n_{s'} for s' < s); slab rows begin + j (j < n_s) of
#   expert le = message slot (le, s, j): data, scales (UE8M0: exponent bytes, four per int32),
#   src_info = header token, src_rank = s, src_slot = header slot; layout_range[le, s] =
#   (begin << 32) | n_s. Program s = R - 1 writes recv_count[le] = sum(n), adds it to the stats
#   and marks the unused rows' src_info / src_rank / src_slot with -1.
@triton.jit
def low_latency_dispatch_receive_kernel(
        ptrs, epochs_ptr, parity, half_base, call_params, params_off, flags_off, data_off, header_off, scales_off,
        rank, max_wait, error_addr, op,
        out_data, out_scales, src_info, src_rank, src_slot, layout_range, recv_count, stats,
        E_LOC: tl.constexpr, NUM_RANKS: tl.constexpr, T: tl.constexpr, H: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_G: tl.constexpr, CHUNK: tl.constexpr, USE_FP8: tl.constexpr, USE_UE8M0: tl.constexpr,
        HAS_STATS: tl.constexpr, INTERPRET: tl.constexpr):
    le = tl.program_id(0)
    s = tl.program_id(1)
    epoch = tl.load(epochs_ptr + 2 + parity)
    tl.store(epochs_ptr + parity, epoch)
    local_base = tl.load(ptrs + rank) + half_base
    error = error_pointer(error_addr)
    ok = wait_sources(local_base, flags_off, params_off, call_params, epoch, max_wait, error, op, rank, NUM_RANKS, BLOCK_R,
                      INTERPRET)
    src = tl.arange(0, BLOCK_R)
    live = src < NUM_RANKS
    mine = (local_base + flags_off).to(tl.pointer_type(tl.int64)) + le * NUM_RANKS + tl.where(live, src, 0)
    ok = ok & wait_all_geq(mine, live, epoch << 32, src, max_wait, error, op, rank, INTERPRET)
    if ok:
        rows = tl.where(live, poll(mine), 0) & 0xFFFFFFFF
        begin = tl.sum(tl.where(src < s, rows, 0), axis=0)
        n = tl.sum(tl.where(src == s, rows, 0), axis=0)
        RT: tl.constexpr = NUM_RANKS * T
        G: tl.constexpr = H // 128
        ROW_WORDS: tl.constexpr = (H if USE_FP8 else 2 * H) // 4
        slot0 = ((le * NUM_RANKS + s) * T).to(tl.int64)
        out_row0 = le.to(tl.int64) * RT + begin
        data = (local_base + data_off).to(tl.pointer_type(tl.int32)) + slot0 * ROW_WORDS
        header = (local_base + header_off).to(tl.pointer_type(tl.int32)) + slot0 * 2
        scales = (local_base + scales_off).to(tl.pointer_type(tl.int32)) + slot0 * G
        words = out_data.to(tl.pointer_type(tl.int32), bitcast=True) + out_row0 * ROW_WORDS
        c = tl.arange(0, CHUNK)
        for j in range(n):
            for start in range(0, ROW_WORDS, CHUNK):
                inside = start + c < ROW_WORDS
                v = tl.load(data + j * ROW_WORDS + start + c, mask=inside, cache_modifier=".cg")
                tl.store(words + j * ROW_WORDS + start + c, v, mask=inside)
            if USE_FP8:
                if USE_UE8M0:
                    W: tl.constexpr = G // 4
                    w = tl.arange(0, BLOCK_G // 4)
                    bits = tl.load(scales + j * G + w[:, None] * 4 + tl.arange(0, 4)[None, :], mask=(w < W)[:, None],
                                   other=0, cache_modifier=".cg")
                    packed = tl.sum(((bits >> 23) & 0xFF) << (tl.arange(0, 4)[None, :] * 8), axis=1)
                    tl.store(out_scales + le.to(tl.int64) * W * RT + w * RT + begin + j, packed, mask=w < W)
                else:
                    g = tl.arange(0, BLOCK_G)
                    f = tl.load((scales + j * G + g).to(tl.pointer_type(tl.float32)), mask=g < G,
                                cache_modifier=".cg")
                    tl.store(out_scales + le.to(tl.int64) * G * RT + g * RT + begin + j, f, mask=g < G)
        r = tl.arange(0, BLOCK_ROWS)
        got = r < n
        hdr = tl.load(header + r[:, None] * 2 + tl.arange(0, 2)[None, :], mask=got[:, None], other=0,
                      cache_modifier=".cg")
        tok = tl.sum(tl.where(tl.arange(0, 2)[None, :] == 0, hdr, 0), axis=1)
        k = tl.sum(tl.where(tl.arange(0, 2)[None, :] == 1, hdr, 0), axis=1)
        tl.store(src_info + out_row0 + r, tok, mask=got)
        tl.store(src_rank + out_row0 + r, tl.zeros_like(r).to(tl.int64) + s, mask=got)
        tl.store(src_slot + out_row0 + r, k.to(tl.int64), mask=got)
        tl.store(layout_range + le * NUM_RANKS + s, (begin.to(tl.int64) << 32) | n.to(tl.int64))
        if s == NUM_RANKS - 1:
            total = begin + n
            tl.store(recv_count + le, total.to(tl.int32))
            if HAS_STATS:
                tl.store(stats + le, tl.load(stats + le) + total.to(tl.int32))
            for start in range(0, RT, BLOCK_ROWS):
                idx = start + r
                unused = (idx >= total) & (idx < RT)
                tl.store(src_info + le.to(tl.int64) * RT + idx, tl.full([BLOCK_ROWS], -1, tl.int32), mask=unused)
                tl.store(src_rank + le.to(tl.int64) * RT + idx, tl.full([BLOCK_ROWS], -1, tl.int64), mask=unused)
                tl.store(src_slot + le.to(tl.int64) * RT + idx, tl.full([BLOCK_ROWS], -1, tl.int64), mask=unused)


def launch_dispatch_receive(ptrs: torch.Tensor, epochs: torch.Tensor, parity: int, half_base: int, call_params: int,
                            offsets: dict[str, int], rank: int, num_ranks: int, num_max_tokens: int, hidden: int,
                            e_loc: int, max_wait: int, error_addr: int, op: int, out_data: torch.Tensor,
                            out_scales: torch.Tensor | None, src_info: torch.Tensor, src_rank: torch.Tensor,
                            src_slot: torch.Tensor, layout_range: torch.Tensor, recv_count: torch.Tensor,
                            stats: torch.Tensor | None, use_fp8: bool, use_ue8m0: bool, interpret: bool) -> None:
    """Fills the receive outputs (shapes as in ``TorchLowLatency.dispatch``) from this rank's heap."""
    row_words = (hidden if use_fp8 else 2 * hidden) // 4
    low_latency_dispatch_receive_kernel[(e_loc, num_ranks)](
        ptrs, epochs, parity, half_base, call_params, offsets["params"], offsets["flags"], offsets["data"],
        offsets["header"], offsets["scales"], rank, max_wait, error_addr, op,
        out_data, out_scales if out_scales is not None else out_data, src_info, src_rank, src_slot, layout_range,
        recv_count, stats if stats is not None else recv_count,
        E_LOC=e_loc, NUM_RANKS=num_ranks, T=num_max_tokens, H=hidden, BLOCK_R=triton.next_power_of_2(num_ranks),
        BLOCK_ROWS=triton.next_power_of_2(num_max_tokens), BLOCK_G=triton.next_power_of_2(max(hidden // 128, 4)),
        CHUNK=min(triton.next_power_of_2(row_words), 1024),
        USE_FP8=use_fp8, USE_UE8M0=use_ue8m0, HAS_STATS=stats is not None, INTERPRET=interpret, num_warps=4)

"""Low-latency combine kernels: the send (expert outputs back to their tokens' ranks) and the
receive (the hook: each token's weighted sum).

Heap areas of one parity (see ``low_latency_dispatch``): ``params`` int64 [R], ``flags`` int64
[E_loc, R] and, reusing the receive area, bf16 [T, K, H]: one row per (token, top-k slot) of
this rank's tokens. ``flags[le, d]`` on rank s has one writer, rank d's send program (le, s), and
holds ``epoch << 32`` once its rows have landed; program (0, s) also writes ``params[d]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moekit.ep.kernels.low_latency_dispatch import wait_sources
from moekit.ep.kernels.sync import error_pointer, peer_pointer, signal, wait_all_geq


# ---------------------------------------------------------------------------------------------- send
# Program (le, s) on rank d: rows begin..begin+n-1 of expert le's slab came from rank s
# (layout_range[le, s] = (begin << 32) | n); row r goes to slot (src_info[r], src_slot[r]) of rank
# s's [T, K, H] area. Then flags[le, d] on s = epoch << 32.
@triton.jit
def low_latency_combine_send_kernel(
        x_ptr, src_info, src_slot, layout_range, ptrs, epochs_ptr, parity, half_base, call_params, params_off, flags_off,
        recv_off, rank, NUM_RANKS: tl.constexpr, T: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
        CHUNK: tl.constexpr):
    le = tl.program_id(0)
    s = tl.program_id(1)
    epoch = tl.load(epochs_ptr + parity) + 1
    tl.store(epochs_ptr + 2 + parity, epoch)
    packed = tl.load(layout_range + le * NUM_RANKS + s)
    begin = packed >> 32
    n = (packed & 0xFFFFFFFF).to(tl.int32)
    RT: tl.constexpr = NUM_RANKS * T
    WORDS: tl.constexpr = H // 2  # a bf16 row as int32 words (H is even)
    c = tl.arange(0, CHUNK)
    for j in range(n):
        row = le.to(tl.int64) * RT + begin + j
        tok = tl.load(src_info + row).to(tl.int64)
        k = tl.load(src_slot + row)
        src = x_ptr.to(tl.pointer_type(tl.int32)) + row * WORDS
        dst = peer_pointer(ptrs, s, half_base + recv_off + (tok * K + k) * (2 * H), tl.int32)
        for start in range(0, WORDS, CHUNK):
            live = start + c < WORDS
            tl.store(dst + start + c, tl.load(src + start + c, mask=live), mask=live)
    if le == 0:
        tl.store(peer_pointer(ptrs, s, half_base + params_off + rank * 8, tl.int64), call_params)
    tl.debug_barrier()
    signal(peer_pointer(ptrs, s, half_base + flags_off + (le * NUM_RANKS + rank) * 8, tl.int64), epoch << 32)


def launch_combine_send(x: torch.Tensor, src_info: torch.Tensor, src_slot: torch.Tensor, layout_range: torch.Tensor,
                        ptrs: torch.Tensor, epochs: torch.Tensor, parity: int, half_base: int, call_params: int,
                        offsets: dict[str, int], rank: int, num_ranks: int, num_max_tokens: int, num_topk: int) -> None:
    """Sends the valid rows of ``x`` bf16 [E_loc, R*T, H] (contiguous) back to their tokens' ranks."""
    e_loc, _, hidden = x.shape
    words = hidden // 2
    low_latency_combine_send_kernel[(e_loc, num_ranks)](
        x, src_info, src_slot, layout_range, ptrs, epochs, parity, half_base, call_params, offsets["params"],
        offsets["flags"], offsets["recv"], rank, NUM_RANKS=num_ranks, T=num_max_tokens, K=num_topk, H=hidden,
        CHUNK=min(triton.next_power_of_2(words), 1024), num_warps=4)


@triton.jit
def _mul_rn(a, b, INTERPRET: tl.constexpr):
    """a * b rounded on its own: ``mul.rn`` is never fused into an FMA with the following add, so
    the sum matches torch's separate multiply and add bit for bit."""
    if INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _to_bf16(v, INTERPRET: tl.constexpr):
    """float32 -> bf16 rounded to nearest even, as torch; the interpreter's own cast truncates."""
    if INTERPRET:
        bits = v.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(tl.bfloat16)


# ------------------------------------------------------------------------------------------- receive
# Program t (token t of this rank), once every source's flags[0, :] and the flags of the experts
# in topk_idx[t] reached this call's epoch:
#   out[t] = bf16(acc), acc = 0; for k in 0..K-1 with topk_idx[t, k] >= 0:
#   acc = acc + w[t, k] * float(row[t, k])   (float32, each product rounded, slot order)
@triton.jit
def low_latency_combine_receive_kernel(
        topk_ptr, weights_ptr, out_ptr, num_tokens, ptrs, epochs_ptr, parity, half_base, call_params, params_off,
        flags_off, recv_off, rank, max_wait, error_addr, op,
        E_LOC: tl.constexpr, NUM_RANKS: tl.constexpr, K: tl.constexpr, H: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    epoch = tl.load(epochs_ptr + 2 + parity)
    tl.store(epochs_ptr + parity, epoch)
    # Even a rank without tokens waits for every source: a source signals this call only after it
    # finished receiving the previous one, so this rank's next send cannot overwrite what a peer
    # still reads.
    local_base = tl.load(ptrs + rank) + half_base
    error = error_pointer(error_addr)
    ok = wait_sources(local_base, flags_off, params_off, call_params, epoch, max_wait, error, op, rank, NUM_RANKS,
                      BLOCK_R, INTERPRET)
    if t < num_tokens:
        kk = tl.arange(0, BLOCK_K)
        ids = tl.load(topk_ptr + t * K + kk, mask=kk < K, other=-1)
        weights = tl.load(weights_ptr + t * K + kk, mask=kk < K, other=0.0)
        valid = ids >= 0
        owner = tl.where(valid, ids // E_LOC, 0)
        flags = (local_base + flags_off).to(tl.pointer_type(tl.int64)) + (ids - owner * E_LOC) * NUM_RANKS + owner
        ok = ok & wait_all_geq(tl.where(valid, flags, (local_base + flags_off).to(tl.pointer_type(tl.int64))), valid,
                               epoch << 32, owner, max_wait, error, op, rank, INTERPRET)
        tl.debug_barrier()
        if ok:
            rows = (local_base + recv_off).to(tl.pointer_type(tl.bfloat16)) + t.to(tl.int64) * K * H
            c = tl.arange(0, CHUNK)
            for start in range(0, H, CHUNK):
                live = start + c < H
                acc = tl.zeros([CHUNK], dtype=tl.float32)
                for k in tl.static_range(K):
                    used = tl.sum(tl.where(kk == k, valid.to(tl.int32), 0), axis=0) > 0
                    w = tl.sum(tl.where(kk == k, weights, 0.0), axis=0)
                    v = tl.load(rows + k * H + start + c, mask=live & used, other=0.0, cache_modifier=".cg")
                    acc = tl.where(used, acc + _mul_rn(w, v.to(tl.float32), INTERPRET), acc)
                tl.store(out_ptr + t.to(tl.int64) * H + start + c, _to_bf16(acc, INTERPRET), mask=live)


def launch_combine_receive(topk_idx: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor, ptrs: torch.Tensor,
                           epochs: torch.Tensor, parity: int, half_base: int, call_params: int, offsets: dict[str, int],
                           rank: int, num_ranks: int, e_loc: int, max_wait: int, error_addr: int, op: int,
                           interpret: bool) -> None:
    """Writes ``out`` bf16 [N, H] (contiguous): each token's weighted sum of its returned rows."""
    n, hidden = out.shape
    k = topk_idx.shape[1]
    low_latency_combine_receive_kernel[(max(n, 1),)](
        topk_idx, topk_weights, out, n, ptrs, epochs, parity, half_base, call_params, offsets["params"], offsets["flags"],
        offsets["recv"], rank, max_wait, error_addr, op, E_LOC=e_loc, NUM_RANKS=num_ranks, K=k, H=hidden,
        BLOCK_R=triton.next_power_of_2(num_ranks), BLOCK_K=triton.next_power_of_2(k),
        CHUNK=min(triton.next_power_of_2(hidden), 2048), INTERPRET=interpret, num_warps=4)

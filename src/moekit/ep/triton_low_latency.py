"""The ``triton`` backend of low-latency dispatch / combine (decoding): kernels that store straight
into peers' memory on a symmetric heap, with no host synchronisation and fixed shapes, so that the
calls can be captured in CUDA graphs.

Each call is a send launch and a receive launch (the receive hook); between them no kernel runs.
Results match ``TorchLowLatency`` bit for bit: the receive order of every expert's slab, the FP8
cast, the counts, ``src_info`` and ``layout_range``, and the combine's float32 sum in slot order.
A combine without the hook may instead sum on the experts' side first
(``low_latency_combine_presum``: half the bytes over NVLink at top-8 over 2 ranks), which
``TorchLowLatency.combine(..., rank_order=True)`` matches bit for bit; see :meth:`presums`.

Double buffering: the heap is split into two halves (parities); calls alternate between them,
dispatch and combine alike, so a call never overwrites what the previous call still reads. A
receive waits for every source's signal of its call, which a source sends only after its own
receive of the call before; so when each rank runs a call's receive before its next send, no send
can overwrite a peer's unread data. With two calls in flight (two micro-batches: send A, send B,
hook A, hook B) every rank must have run hook A before any rank sends the call after B, as in
DeepEP ("at most two results at a time"). A CUDA graph should capture calls in dispatch / combine
pairs so that eager calls and replays keep alternating. Every rank must make the same calls.

Instead of a host collective per call, each message carries its sender's sizes (``params``); a
receiver that finds a peer's sizes unlike its own writes nothing and the host raises ``ValueError``
naming both ranks. Errors found by kernels are reported by the call after the one that found them
on GPUs (the host reads the record without synchronising), at once under the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from moekit.ep.config import LOW_LATENCY_TOPK_BITS
from moekit.ep.heap import SymmetricHeap, interpreting
from moekit.ep.kernels.low_latency_combine import launch_combine_receive, launch_combine_send
from moekit.ep.kernels.low_latency_combine_presum import launch_presum_receive, launch_presum_send
from moekit.ep.kernels.low_latency_dispatch import launch_dispatch_receive, launch_dispatch_send
from moekit.ep.kernels.sync import ErrorRecord, op_code, wait_budget
from moekit.ep.results import LowLatencyHandle, empty_low_latency_outputs
from moekit.fp8 import GROUP

_ALIGN = 128
# Bit widths of the sizes packed into a call's params word (see _params).
_LIMITS = {"num_max_dispatch_tokens_per_rank": 16, "hidden": 23, "num_experts": 14, "num_topk": LOW_LATENCY_TOPK_BITS}
# Bytes a rank must expect to send less before a combine sums on the experts' side: that costs a
# launch and a wait for the peers' weights, a few microseconds (see BENCHMARKS.md).
PRESUM_MIN_SAVED_BYTES = 1 << 20
# Top-k slots the summing combine's weights area holds per token: every top-k the params allow.
PRESUM_MAX_TOPK = 1 << LOW_LATENCY_TOPK_BITS


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class Layout:
    """Byte offsets inside one parity's half of the heap.

    ``params`` int64 [R], ``flags`` int64 [E_loc, R] and ``rows`` int64 [E_loc, R] (a dispatch's row
    count per (local expert, source)) sit at fixed offsets (they do not depend on the sizes, so a
    receiver can read a peer's params even when the sizes disagree). The receive area holds a
    dispatch's token rows (``data`` [R, T, row bytes], ``scales`` [R, T, H/128] float32) and
    message slots (``header`` int32 [E, T, 2]), or combine rows [T, K, H] bf16, or the summing
    combine's partial rows float32 [R, T, H]; ``send`` is the zero-copy combine source [E_loc, R*T,
    H] bf16; ``weights`` the summing combine's tagged weights int64 [R, T, K] (K < 64), an area
    that nothing else writes, so that no stale word can carry a later call's tag. ``end`` is the
    first byte past it.
    """

    params: int
    flags: int
    rows: int
    recv: int
    recv_bytes: int
    data: int
    header: int
    scales: int
    weights: int
    send: int
    end: int

    def offsets(self) -> dict[str, int]:
        return {"params": self.params, "flags": self.flags, "rows": self.rows, "recv": self.recv,
                "data": self.data, "header": self.header, "scales": self.scales, "weights": self.weights}


def make_layout(num_ranks: int, num_max_tokens: int, hidden: int, num_experts: int, use_fp8: bool) -> Layout:
    """The areas of one parity; within ``config.low_latency_size_hint`` / 2 by construction."""
    t, e = num_max_tokens, num_experts
    groups = hidden // GROUP
    recv = _align(8 * (num_ranks + 2 * e))
    # A bound, not the exact need: combine rows [T, K, H] with K <= E, and a dispatch's areas, which
    # it bounded when every (token, expert) pair had a message of its own (they take R/E of that now).
    recv_bytes = _align(max(e * t * (16 + max(2 * hidden, hidden + groups * 4)), e * t * 2 * hidden))
    row_bytes = hidden if use_fp8 else 2 * hidden
    header = recv + num_ranks * t * row_bytes
    send = recv + recv_bytes
    weights = send + _align(e * t * 2 * hidden)
    return Layout(params=0, flags=8 * num_ranks, rows=8 * (num_ranks + e), recv=recv, recv_bytes=recv_bytes, data=recv,
                  header=header, scales=header + e * t * 8, send=send, weights=weights,
                  end=weights + _align(num_ranks * t * PRESUM_MAX_TOPK * 8))


def presum_saved_bytes(num_ranks: int, num_max_tokens: int, hidden: int, num_topk: int) -> float:
    """Bytes a rank sends its peers less in a full combine (T tokens, experts chosen uniformly)
    when it sums on the experts' side: one float32 row per (token, rank holding one of its
    experts) instead of one bf16 row per (token, expert)."""
    r, t, k = num_ranks, num_max_tokens, num_topk
    per_pair = t * k * (r - 1) / r * 2 * hidden
    reach = 1 - (1 - 1 / r) ** k  # the chance that a token has an expert on a given rank
    return per_pair - t * (r - 1) * reach * 4 * hidden


def _params(combine: bool, sizes: dict[str, int], use_fp8: bool, use_ue8m0: bool, presum: bool = False) -> int:
    """One int64 that two ranks' calls share exactly when they agree (op, protocol, sizes, formats)."""
    word = int(presum) * 8 + int(combine) * 4 + int(use_fp8) * 2 + int(use_ue8m0)
    for name, bits in _LIMITS.items():
        value = sizes[name]
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{name}: the triton backend supports values below {1 << bits}, got {value}")
        word = (word << bits) | value
    return word


class TritonLowLatency:
    """Low-latency dispatch / combine over NVLink (or the simulated heap under the interpreter).

    Args:
        group: the process group; device: this rank's device.
        settings: ``backends.EngineSettings``; the heap has ``num_rdma_bytes`` bytes (both parities).

    Attributes:
        combine_presum: ``None`` (default) lets :meth:`presums` choose the combine protocol per call;
            ``True`` / ``False`` force summing on the experts' side (where it fits) or not. Every
            rank must use the same setting.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, settings) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self.timeout_s = settings.timeout_s
        self.interpret = interpreting()
        self.heap = None
        if settings.low_latency_mode and settings.num_rdma_bytes > 0:
            self.heap = SymmetricHeap(group, settings.num_rdma_bytes, device)
            self.half = self.heap.nbytes // 2 // _ALIGN * _ALIGN
        # [0, p]: calls completed at parity p; [1, p]: the epoch of the call in flight there.
        self.epochs = torch.zeros((2, 2), dtype=torch.int64, device=device)
        self.errors = ErrorRecord(device)
        self.max_wait = wait_budget(self.timeout_s, self.interpret)
        self.combine_presum: bool | None = None
        self._calls = 0

    # ------------------------------------------------------------------ helpers
    def check(self) -> None:
        """Raises what a kernel recorded: ``TimeoutError`` (a peer did not answer in time) or
        ``ValueError`` (ranks disagreed on a call's sizes)."""
        self.errors.check(self.timeout_s)

    def _layout(self, t_max: int, hidden: int, num_experts: int, num_topk: int, use_fp8: bool) -> Layout:
        if self.heap is None:
            raise ValueError("num_rdma_bytes: the triton low-latency engine needs a low-latency buffer "
                             "(Buffer(..., low_latency_mode=True, num_rdma_bytes=...))")
        layout = make_layout(self.num_ranks, t_max, hidden, num_experts, use_fp8)
        if layout.end > self.half or t_max * num_topk * 2 * hidden > layout.recv_bytes:
            raise ValueError(f"num_rdma_bytes: {self.heap.nbytes} bytes cannot hold T={t_max}, H={hidden}, "
                             f"E={num_experts}, top-k={num_topk} (need {2 * layout.end} bytes, and top-k <= E)")
        return layout

    def presums(self, num_max_tokens: int, hidden: int, num_experts: int, num_topk: int, hook: bool) -> bool:
        """Whether a combine of these sizes sums on the experts' side: never with the receive hook
        (its send half must not wait for the peers' weights), only where the receive area holds
        the partial rows (float32 [R, T, H]), and then where ``combine_presum`` says so, or by
        default where it saves at least ``PRESUM_MIN_SAVED_BYTES`` (:func:`presum_saved_bytes`)."""
        return self._presums(self._layout(num_max_tokens, hidden, num_experts, num_topk, False), num_max_tokens,
                             hidden, num_topk, hook)

    def _presums(self, layout: Layout, num_max_tokens: int, hidden: int, num_topk: int, hook: bool) -> bool:
        fits = self.num_ranks * num_max_tokens * hidden * 4 <= layout.recv_bytes
        if hook or not fits or self.num_ranks == 1:
            return False
        if self.combine_presum is not None:
            return self.combine_presum
        return presum_saved_bytes(self.num_ranks, num_max_tokens, hidden, num_topk) >= PRESUM_MIN_SAVED_BYTES

    def _next_parity(self) -> tuple[int, int]:
        parity = self._calls & 1
        self._calls += 1
        return parity, parity * self.half

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_tokens: int, num_experts: int, *,
                 use_fp8: bool, round_scale: bool, use_ue8m0: bool,
                 cumulative_local_expert_recv_stats: torch.Tensor | None,
                 defer_receive: bool):
        """Returns (recv_x, recv_count, handle, receive) where ``receive()`` completes the outputs.

        Shapes as ``TorchLowLatency.dispatch``; the outputs are fresh tensors, filled by ``receive``.
        """
        self.check()
        r, t_max, k = self.num_ranks, num_max_tokens, topk_idx.shape[1]
        hidden = x.shape[1]
        e_loc = num_experts // r
        layout = self._layout(t_max, hidden, num_experts, k, use_fp8)
        params = _params(False, {"num_max_dispatch_tokens_per_rank": t_max, "hidden": hidden,
                                 "num_experts": num_experts, "num_topk": k}, use_fp8, use_ue8m0)
        parity, half_base = self._next_parity()
        x, topk_idx = x.contiguous(), topk_idx.contiguous()
        launch_dispatch_send(x, topk_idx, self.heap.ptrs, self.epochs, parity, half_base, params, layout.offsets(),
                             self.rank, r, t_max, num_experts, use_fp8, round_scale, self.interpret)

        recv_data, recv_scales, recv_count, handle = empty_low_latency_outputs(
            r, t_max, hidden, num_experts, k, use_fp8, use_ue8m0, self.device)
        stats = cumulative_local_expert_recv_stats

        def receive() -> None:
            launch_dispatch_receive(self.heap.ptrs, self.epochs, parity, half_base, params, layout.offsets(),
                                    self.rank, r, t_max, hidden, e_loc, self.max_wait, self.errors.address,
                                    op_code("low_latency_dispatch"), recv_data, recv_scales, handle.src_info,
                                    handle.src_rank, handle.src_slot, handle.token_rows, handle.layout_range,
                                    recv_count, stats, use_fp8, use_ue8m0, self.interpret)
            self.check()

        if not defer_receive:
            receive()
        recv_x = (recv_data, recv_scales) if use_fp8 else recv_data
        return recv_x, recv_count, handle, receive

    # ------------------------------------------------------------------- combine
    def combine_buffer(self, num_max_tokens: int, hidden: int, num_experts: int) -> torch.Tensor:
        """The bf16 [E_loc, R*T, H] heap area that the next zero-copy combine sends from."""
        layout = self._layout(num_max_tokens, hidden, num_experts, 1, False)
        parity = self._calls & 1
        shape = (num_experts // self.num_ranks, self.num_ranks * num_max_tokens, hidden)
        return self.heap.view(parity * self.half + layout.send, shape, torch.bfloat16)

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                handle: LowLatencyHandle, *, zero_copy: bool, out: torch.Tensor | None,
                defer_receive: bool) -> tuple[torch.Tensor, Callable[[], None]]:
        """Returns (result bf16 [N, H], receive); shapes as ``TorchLowLatency.combine``."""
        self.check()
        _, _, t_max, hidden, num_experts = handle
        r, k = self.num_ranks, handle.num_topk
        layout = self._layout(t_max, hidden, num_experts, k, False)
        source = self.combine_buffer(t_max, hidden, num_experts) if zero_copy else x.contiguous()
        presum = self._presums(layout, t_max, hidden, k, defer_receive)
        params = _params(True, {"num_max_dispatch_tokens_per_rank": t_max, "hidden": hidden,
                                "num_experts": num_experts, "num_topk": k}, False, False, presum)
        parity, half_base = self._next_parity()
        topk_idx, topk_weights = topk_idx.contiguous(), topk_weights.contiguous()
        op = op_code("low_latency_combine")
        if presum:
            launch_presum_send(source, topk_weights, handle, self.heap.ptrs, self.epochs, parity, half_base, params,
                               layout.offsets(), self.rank, r, self.max_wait, self.errors.address, op, self.interpret)
        else:
            launch_combine_send(source, handle.src_info, handle.src_slot, handle.layout_range, self.heap.ptrs,
                                self.epochs, parity, half_base, params, layout.offsets(), self.rank, r, t_max, k)
        n = topk_idx.shape[0]
        result = out if out is not None else torch.empty((n, hidden), dtype=torch.bfloat16, device=self.device)
        target = result if result.is_contiguous() else torch.empty_like(result, memory_format=torch.contiguous_format)

        def receive() -> None:
            if presum:
                launch_presum_receive(topk_idx, target, self.heap.ptrs, self.epochs, parity, half_base, params,
                                      layout.offsets(), self.rank, r, t_max, num_experts // r, self.max_wait,
                                      self.errors.address, op, self.interpret)
            else:
                launch_combine_receive(topk_idx, topk_weights, target, self.heap.ptrs, self.epochs, parity, half_base,
                                       params, layout.offsets(), self.rank, r, num_experts // r, self.max_wait,
                                       self.errors.address, op, self.interpret)
            if target is not result:
                result.copy_(target)
            self.check()

        if not defer_receive:
            receive()
        return result, receive

    def clean(self) -> None:
        """Zeroes the heap and the epochs on every rank (collective: every rank must call it)."""
        if self.heap is None:
            return
        self.heap.barrier()
        self.heap.local.zero_()
        self.epochs.zero_()
        self.errors.words.zero_()
        self._calls = 0
        self.heap.barrier()

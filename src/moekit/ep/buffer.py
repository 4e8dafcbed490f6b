"""``Buffer``: expert-parallel dispatch and combine, high-throughput and low-latency.

The methods take DeepEP v1's arguments, names and order, and return named tuples that unpack like
DeepEP's tuples. Inputs are checked on each rank before any communication. The work is done by a
backend; ``torch`` (collectives only, the reference) runs everywhere.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.distributed as dist

from moekit.ep import validate as v
from moekit.ep.backends import EngineSettings, available_backends, make_engines
from moekit.ep.config import Config, low_latency_size_hint, recommended_config
from moekit.ep.events import CommStream, EventOverlap, capture_event
from moekit.ep.layout import DispatchLayout, compute_dispatch_layout
from moekit.ep.results import (Activation, CombineResult, DispatchHandle, DispatchResult, LowLatencyCombineResult,
                               LowLatencyDispatchResult, LowLatencyHandle)
from moekit.ep.agreement import check_agreement



def _no_hook() -> None:
    """The hook returned when ``return_recv_hook`` is off: the receive already happened."""


def _group_device(group: dist.ProcessGroup) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Buffer:
    """Expert-parallel communication for one process group.

    Args:
        group: the ``torch.distributed`` process group of the expert-parallel ranks (``None``: the
            default group). Every rank of it must create the Buffer.
        num_nvl_bytes: bytes of NVLink buffer for high-throughput mode (see ``Config`` size hints).
        num_rdma_bytes: bytes of buffer for low-latency mode; at least
            ``get_low_latency_rdma_size_hint(T, H, R, E)`` for the largest call.
        low_latency_mode: enables ``low_latency_dispatch`` / ``low_latency_combine``.
        num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl, enable_shrink: accepted for
            compatibility with DeepEP; moekit's single-host paths do not use them.
        explicitly_destroy: if True, ``destroy()`` must be called to release the buffer.
        comm: DeepEP's MPI alternative to ``group``; not supported (pass a process group).
        backend: ``"auto"`` (the fastest available for this group; ``MOEKIT_EP_BACKEND`` overrides),
            ``"triton"`` (kernels over NVLink on a symmetric heap) or ``"torch"`` (collectives only).
        timeout_s: time limit of every wait across ranks; on expiry the call raises ``TimeoutError``
            naming the op, the rank and the peer.

    Attributes: ``rank``, ``group_size``, ``group``, ``backend``, ``device``.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm: object = None, *,
                 backend: str = "auto", timeout_s: float = 100.0) -> None:
        if comm is not None:
            raise ValueError("comm: MPI communicators are not supported; pass a torch.distributed group")
        if not dist.is_initialized():
            raise RuntimeError("Buffer needs torch.distributed: call dist.init_process_group first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            v.check_positive_int(name, value, minimum=0)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = explicitly_destroy
        self.device = _group_device(self.group)
        check_agreement(self.group, "Buffer", {"num_nvl_bytes": num_nvl_bytes, "num_rdma_bytes": num_rdma_bytes,
                                               "low_latency_mode": int(self.low_latency_mode)}, self.device)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
        usable = available_backends(self.group, self.device)
        chosen = os.environ.get("MOEKIT_EP_BACKEND", backend) if backend == "auto" else backend
        if chosen == "auto":
            chosen = usable[0]
        if chosen not in usable:
            raise ValueError(f"backend: expected 'auto' or one of {usable} (usable for this group), got {chosen!r}")
        self.backend = chosen
        self.timeout_s = float(timeout_s)
        self._comm = CommStream(self.device)
        settings = EngineSettings(num_nvl_bytes, num_rdma_bytes, self.low_latency_mode, self.timeout_s)
        self._normal, self._low_latency = make_engines(chosen, self.group, self.device, settings)
        self._destroyed = False

    # ------------------------------------------------------------------ settings
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SMs the high-throughput kernels may use (an even number)."""
        v.check_positive_int("new_num_sms", new_num_sms, minimum=2)
        if new_num_sms % 2:
            raise ValueError(f"new_num_sms: expected an even number, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """The recommended dispatch ``Config`` for a group of ``num_ranks``."""
        return recommended_config(num_ranks, Buffer.num_sms, for_combine=False)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """The recommended combine ``Config`` for a group of ``num_ranks``."""
        return recommended_config(num_ranks, Buffer.num_sms, for_combine=True)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Minimum ``num_rdma_bytes`` for low-latency calls of these sizes (bf16-sized, both parities)."""
        return low_latency_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream, to pass as ``previous_event``."""
        return capture_event()

    def get_comm_stream(self) -> Optional[torch.cuda.Stream]:
        """The stream communication runs on (``None`` on a CPU)."""
        return self._comm.stream

    def destroy(self) -> None:
        """Releases the buffer; only with ``explicitly_destroy=True``."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy(): the Buffer was created with explicitly_destroy=False")
        self._low_latency.clean()
        self._destroyed = True

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed")

    # ------------------------------------------------------------ high-throughput
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> DispatchLayout:
        """Counts where each token goes. No communication.

        Args:
            topk_idx: int64 [N, K] expert ids per token, -1 for an empty slot.
            num_experts: E, a multiple of the group size.
        Returns:
            :class:`DispatchLayout`: ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank or None,
            num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool, event)``.
        """
        self._check_alive()
        v.check_num_experts(num_experts, self.group_size)
        v.check_topk_idx(topk_idx, num_experts, self.device)
        with self._comm.scope(previous_event, async_finish, allocate_on_comm_stream) as work:
            layout = compute_dispatch_layout(topk_idx, num_experts, self.group_size)
            work.keep(*layout)
        return DispatchLayout(*layout, work.event)

    def dispatch(self, x: Activation, handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None, num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> DispatchResult:
        """Sends each token once to every rank that holds one of its experts.

        Args:
            x: bf16 [N, H], or the FP8 pair (float8_e4m3fn [N, H], float32 scales [N, H/128], any strides).
            handle: a previous dispatch's handle: reuse its layout (cached mode; pass no top-k).
            num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert: from ``get_dispatch_layout``
                (required unless ``handle`` is given); ``num_tokens_per_rdma_rank`` likewise, may be None.
            topk_idx: int64 [N, K] global expert ids (-1 empty). Sent and rewritten to local ids.
            topk_weights: float32 [N, K], sent along.
            expert_alignment: round each local expert's received count up to a multiple of this.
            num_worst_tokens: if > 0, the received tensors have exactly this many rows (padding rows
                have top-k ids -1), and the per-expert list is empty.
            config: tuning knobs (see :class:`Config`); the torch backend ignores them.
            previous_event, async_finish, allocate_on_comm_stream: stream ordering, as in DeepEP.
        Returns:
            :class:`DispatchResult` ``(recv_x, recv_topk_idx, recv_topk_weights,
            num_recv_tokens_per_expert_list, handle, event)``. Rows arrive grouped by source rank in
            rank order, each source's tokens in their original order.
        """
        self._check_alive()
        act = v.check_activation(x, self.device)
        v.check_positive_int("expert_alignment", expert_alignment)
        v.check_positive_int("num_worst_tokens", num_worst_tokens, minimum=0)
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config: expected moekit.ep.Config, got {type(config).__name__}")
        num_experts = None
        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise TypeError(f"handle: expected the handle a dispatch returned, got {type(handle).__name__}")
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx / topk_weights: must be None for a cached dispatch (handle given)")
            if handle.is_token_in_rank.shape[0] != act.num_tokens:
                raise ValueError(f"x: the handle was made for {handle.is_token_in_rank.shape[0]} tokens, "
                                 f"got {act.num_tokens}")
        else:
            for name, t in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
                if t is None:
                    raise ValueError(f"{name}: required unless a handle is given (see get_dispatch_layout)")
            v.check_tensor("num_tokens_per_rank", num_tokens_per_rank, torch.int32, 1, self.device)
            v.check_shape("num_tokens_per_rank", num_tokens_per_rank, (self.group_size,))
            v.check_tensor("is_token_in_rank", is_token_in_rank, torch.bool, 2, self.device)
            v.check_shape("is_token_in_rank", is_token_in_rank, (act.num_tokens, self.group_size))
            v.check_tensor("num_tokens_per_expert", num_tokens_per_expert, torch.int32, 1, self.device)
            num_experts = v.check_num_experts(num_tokens_per_expert.shape[0], self.group_size)
            if topk_idx is not None:
                # An engine that reads the device anyway checks the ids' range in that same read.
                deferred = self._normal.reads_topk_range and not num_worst_tokens
                v.check_topk_idx(topk_idx, num_experts, self.device, act.num_tokens, values=not deferred)
            if topk_weights is not None:
                if topk_idx is None:
                    raise ValueError("topk_weights: needs topk_idx")
                v.check_topk_weights(topk_weights, topk_idx)
        with self._comm.scope(previous_event, async_finish, allocate_on_comm_stream) as work:
            data, scales, recv_idx, recv_weights, per_expert, new_handle = self._normal.dispatch(
                act, handle=handle, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts,
                expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                num_tokens_per_expert=num_tokens_per_expert)
            work.keep(data, scales, recv_idx, recv_weights, *(new_handle or ()))
        recv_x = (data, scales) if scales is not None else data
        return DispatchResult(recv_x, recv_idx, recv_weights, per_expert, new_handle, work.event)

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False) -> CombineResult:
        """The reverse of dispatch: rows go back and each token's rows are summed WITHOUT weights.

        Args:
            x: bf16 [M, H], the received rows (processed), in dispatch's receive order.
            handle: the handle of that dispatch.
            topk_weights: float32 [M, K], summed the same way (optional).
            bias: one or two bf16 [N, H] tensors added to the sum.
        Returns:
            :class:`CombineResult` ``(combined_x bf16 [N, H], combined_topk_weights float32 [N, K] or None,
            event)``; sums are float32, ranks added in rank order, then the biases.
        """
        self._check_alive()
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the handle a dispatch returned, got {type(handle).__name__}")
        v.check_tensor("x", x, torch.bfloat16, 2, self.device)
        rows = handle.recv_src_idx.shape[0]
        if x.shape[0] != rows:
            raise ValueError(f"x: expected {rows} rows (as dispatch returned), got shape {tuple(x.shape)}")
        if topk_weights is not None:
            v.check_tensor("topk_weights", topk_weights, torch.float32, 2, self.device)
            if topk_weights.shape[0] != rows:
                raise ValueError(f"topk_weights: expected {rows} rows, got shape {tuple(topk_weights.shape)}")
        num_tokens = handle.is_token_in_rank.shape[0]
        biases = v.check_bias(bias, num_tokens, x.shape[1], self.device)
        with self._comm.scope(previous_event, async_finish, allocate_on_comm_stream) as work:
            combined, weights = self._normal.combine(x, handle, topk_weights, biases)
            work.keep(combined, weights)
        return CombineResult(combined, weights, work.event)

    # ---------------------------------------------------------------- low latency
    def _check_low_latency(self, num_max_tokens: int, hidden: int, num_experts: int) -> None:
        if not self.low_latency_mode:
            raise ValueError("low-latency calls need Buffer(..., low_latency_mode=True)")
        need = self.get_low_latency_rdma_size_hint(num_max_tokens, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < need:
            raise ValueError(f"num_rdma_bytes: {self.num_rdma_bytes} is too small for T={num_max_tokens}, "
                             f"H={hidden}, E={num_experts}; need >= {need} (get_low_latency_rdma_size_hint)")

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> LowLatencyDispatchResult:
        """Decoding dispatch: every (token, expert) pair to its expert's slab; fixed shapes.

        Args:
            x: bf16 [N, H], N <= T. H a multiple of 128 with ``use_fp8`` (512 with ``use_ue8m0``), else of 8.
            topk_idx: int64 [N, K] global expert ids, -1 empty; no expert twice in one row.
            num_max_dispatch_tokens_per_rank: T, the same on every rank.
            num_experts: E, the same on every rank, a multiple of the group size.
            cumulative_local_expert_recv_stats: int32 [E_loc]; received counts are added to it.
            dispatch_wait_recv_cost_stats: int64 [R] (or [R, R]) wait-time statistics; accepted, and
                left unchanged by the torch backend, which has no per-peer wait to measure.
            use_fp8: cast to e4m3 with per-token 128-channel scales before sending.
            round_scale: round scales up to powers of two. use_ue8m0: pack them as UE8M0 (needs round_scale).
            async_finish: return at once with an event (not with ``return_recv_hook``).
            return_recv_hook: only send now; call the returned hook to receive.
        Returns:
            :class:`LowLatencyDispatchResult` ``(recv_x, recv_count, handle, event, hook)``.
        """
        self._check_alive()
        v.check_tensor("x", x, torch.bfloat16, 2, self.device)
        n, hidden = x.shape
        t_max = v.check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        v.check_num_experts(num_experts, self.group_size)
        if n > t_max:
            raise ValueError(f"x: {n} tokens exceed num_max_dispatch_tokens_per_rank={t_max}")
        if use_ue8m0 and not round_scale:
            raise ValueError("use_ue8m0: needs round_scale=True (UE8M0 stores power-of-two scales)")
        multiple = 512 if use_ue8m0 else 128 if use_fp8 else 8
        if hidden % multiple:
            raise ValueError(f"x: hidden size must be a multiple of {multiple} here, got {hidden}")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot be combined")
        v.check_topk_idx(topk_idx, num_experts, self.device, n, distinct=True)
        e_loc = num_experts // self.group_size
        if cumulative_local_expert_recv_stats is not None:
            v.check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, torch.int32, 1,
                           self.device)
            v.check_shape("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, (e_loc,))
        if dispatch_wait_recv_cost_stats is not None:
            _check_wait_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, self.group_size,
                              self.device)
        self._check_low_latency(t_max, hidden, num_experts)
        with self._comm.scope(None, async_finish, False) as work:
            recv_x, recv_count, handle, receive = self._low_latency.dispatch(
                x, topk_idx, t_max, num_experts, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
                cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
                defer_receive=return_recv_hook)
            work.keep(*(recv_x if use_fp8 else (recv_x,)), recv_count, handle.src_info, handle.layout_range)
        return LowLatencyDispatchResult(recv_x, recv_count, handle, work.event,
                                        receive if return_recv_hook else _no_hook)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None) -> LowLatencyCombineResult:
        """Decoding combine: rows go back and each token gets the WEIGHTED sum over its top-k slots.

        The sum is float32, in top-k slot order. Without the hook, the triton backend may instead
        sum on the experts' side first (see README, "The triton backend"): float32 per expert rank
        in slot order, then over the ranks, which can differ from slot order in the last bit.

        Args:
            x: bf16 [E_loc, R*T, H], expert outputs in the dispatch layout (ignored with ``zero_copy``,
                which reads the buffer ``get_next_low_latency_combine_buffer`` returned).
            topk_idx: int64 [N, K] and topk_weights: float32 [N, K], as passed to the dispatch.
            handle: the dispatch's handle.
            use_logfmt: DeepEP's 10-bit transport format; moekit sends bf16, which is exact, instead.
            out: optional bf16 [N, H] output.
            combine_wait_recv_cost_stats: as in dispatch.
        Returns:
            :class:`LowLatencyCombineResult` ``(combined_x bf16 [N, H], event, hook)``.
        """
        self._check_alive()
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle low_latency_dispatch returned, got {type(handle).__name__}")
        _, _, t_max, hidden, num_experts = handle
        self._check_low_latency(t_max, hidden, num_experts)
        e_loc = num_experts // self.group_size
        if not zero_copy:
            v.check_tensor("x", x, torch.bfloat16, 3, self.device)
            v.check_shape("x", x, (e_loc, self.group_size * t_max, hidden))
        v.check_topk_idx(topk_idx, num_experts, self.device)
        if topk_idx.shape[1] != handle.num_topk:
            raise ValueError(f"topk_idx: expected {handle.num_topk} slots as in the dispatch, got {topk_idx.shape[1]}")
        v.check_topk_weights(topk_weights, topk_idx)
        if out is not None:
            v.check_tensor("out", out, torch.bfloat16, 2, self.device)
            v.check_shape("out", out, (topk_idx.shape[0], hidden))
        if combine_wait_recv_cost_stats is not None:
            _check_wait_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, self.group_size,
                              self.device)
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot be combined")
        with self._comm.scope(None, async_finish, False) as work:
            combined, receive = self._low_latency.combine(x, topk_idx, topk_weights, handle, zero_copy=zero_copy,
                                                          out=out, defer_receive=return_recv_hook)
            work.keep(combined)
        return LowLatencyCombineResult(combined, work.event, receive if return_recv_hook else _no_hook)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """bf16 [E_loc, R*T, H]: write expert outputs here, then combine with ``zero_copy=True``."""
        self._check_alive()
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle low_latency_dispatch returned, got {type(handle).__name__}")
        _, _, t_max, hidden, num_experts = handle
        return self._low_latency.combine_buffer(t_max, hidden, num_experts)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Resets low-latency state (zero-copy buffers and their alternation)."""
        self._check_alive()
        v.check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        v.check_positive_int("hidden", hidden)
        v.check_num_experts(num_experts, self.group_size)
        self._low_latency.clean()


def _check_wait_stats(name: str, stats: torch.Tensor, num_ranks: int, device: torch.device) -> None:
    if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 tensor")
    if tuple(stats.shape) not in ((num_ranks,), (num_ranks, num_ranks)):
        raise ValueError(f"{name}: expected shape ({num_ranks},) or ({num_ranks}, {num_ranks}), "
                         f"got {tuple(stats.shape)}")
    if stats.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {stats.device}")

"""What EP calls return: named tuples, so they unpack exactly like DeepEP's tuples."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import torch

from moekit.ep.events import EventOverlap

Activation = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


class DispatchHandle(NamedTuple):
    """What combine and cached dispatch need to retrace a dispatch.

    Attributes:
        rank_prefix_matrix: int32 [R, R]; entry [i][j] is the end offset, in rank j's received rows,
            of the block that came from rank i (inclusive prefix over i).
        recv_src_idx: int32 [M]: each received row's token index on its source rank (-1 on padding
            rows when ``num_worst_tokens`` was given; then M = num_worst_tokens).
        is_token_in_rank: bool [N, R] of the sending side: which tokens went where.
        max_recv_rows: the most rows any rank of the group received (a host int), or ``None``.
        max_tokens_per_rank: the most tokens any rank of the group sent from, or ``None``. The triton
            engine sizes the rounds of cached dispatch and combine from these two without asking the
            device; engines that need no rounds leave them ``None``.
        rank_prefix_host: ``rank_prefix_matrix`` as host ints where the dispatch read it (none with
            ``num_worst_tokens``), else ``None``; the triton engine's combine sizes its copies with it.
    """

    rank_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    max_recv_rows: Optional[int] = None
    max_tokens_per_rank: Optional[int] = None
    rank_prefix_host: Optional[tuple[tuple[int, ...], ...]] = None


class DispatchResult(NamedTuple):
    """Result of ``dispatch``; unpacks as DeepEP's 6-tuple.

    Attributes:
        recv_x: bf16 [M, H], or the FP8 pair (float8_e4m3fn [M, H], float32 [M, H/128]).
        recv_topk_idx: int64 [M, K] local expert ids (-1 where the slot's expert lives elsewhere), or
            ``None`` for a cached dispatch.
        recv_topk_weights: float32 [M, K], 0 where ``recv_topk_idx`` is -1; ``None`` if not sent.
        num_recv_tokens_per_expert_list: list of E_loc ints rounded up to ``expert_alignment``; empty
            with ``num_worst_tokens``; ``None`` for a cached dispatch.
        handle: the :class:`DispatchHandle` (``None`` for a cached dispatch).
        event: see :class:`EventOverlap`.
    """

    recv_x: Activation
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert_list: Optional[list[int]]
    handle: Optional[DispatchHandle]
    event: EventOverlap


class CombineResult(NamedTuple):
    """Result of ``combine``: bf16 [N, H] sums, float32 [N, K] summed weights (or ``None``), event."""

    combined_x: torch.Tensor
    combined_topk_weights: Optional[torch.Tensor]
    event: EventOverlap


class LowLatencyHandle(tuple):
    """DeepEP's low-latency handle ``(src_info, layout_range, T, H, E)``, plus what combine needs.

    ``src_info`` int32 [E_loc, R*T]: each received row's token index on its source rank;
    ``layout_range`` int64 [E_loc, R]: ``(begin << 32) | count`` of each source rank's block in an
    expert's slab. The attributes ``src_rank`` and ``src_slot`` (int64 [E_loc, R*T], -1 on unused
    rows) say which rank and which top-k slot each row came from; ``token_rows`` (int32 [R, T, K])
    the other way round: the slab row ``e * R*T + i`` (expert e, row i) that (source rank, token,
    top-k slot) landed in, undefined for the pairs that did not come to this rank.
    """

    src_rank: torch.Tensor
    src_slot: torch.Tensor
    token_rows: torch.Tensor
    num_topk: int

    def __new__(cls, src_info: torch.Tensor, layout_range: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                hidden: int, num_experts: int, *, src_rank: torch.Tensor, src_slot: torch.Tensor,
                token_rows: torch.Tensor, num_topk: int) -> "LowLatencyHandle":
        self = super().__new__(cls, (src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts))
        self.src_rank, self.src_slot, self.token_rows, self.num_topk = src_rank, src_slot, token_rows, num_topk
        return self

    @property
    def src_info(self) -> torch.Tensor:
        return self[0]

    @property
    def layout_range(self) -> torch.Tensor:
        return self[1]


def empty_low_latency_outputs(num_ranks: int, num_max_tokens: int, hidden: int, num_experts: int, num_topk: int,
                              use_fp8: bool, use_ue8m0: bool, device: torch.device):
    """Fresh receive tensors of a low-latency dispatch: ``(recv_data, recv_scales, recv_count, handle)``.

    Shapes as :class:`LowLatencyDispatchResult` documents; FP8 scales are column-major in their last
    two dimensions (allocated [E_loc, width, R*T] and transposed), as TMA-based grouped GEMMs read them.
    """
    e_loc, rows = num_experts // num_ranks, num_ranks * num_max_tokens
    recv_data = torch.empty((e_loc, rows, hidden), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
                            device=device)
    recv_scales = None
    if use_fp8:
        groups = hidden // 128
        width = (groups + 3) // 4 if use_ue8m0 else groups
        dtype = torch.int32 if use_ue8m0 else torch.float32
        recv_scales = torch.empty((e_loc, width, rows), dtype=dtype, device=device).transpose(1, 2)
    recv_count = torch.empty(e_loc, dtype=torch.int32, device=device)
    handle = LowLatencyHandle(torch.empty((e_loc, rows), dtype=torch.int32, device=device),
                              torch.empty((e_loc, num_ranks), dtype=torch.int64, device=device),
                              num_max_tokens, hidden, num_experts,
                              src_rank=torch.empty((e_loc, rows), dtype=torch.int64, device=device),
                              src_slot=torch.empty((e_loc, rows), dtype=torch.int64, device=device),
                              token_rows=torch.empty((num_ranks, num_max_tokens, num_topk), dtype=torch.int32,
                                                     device=device),
                              num_topk=num_topk)
    return recv_data, recv_scales, recv_count, handle


class LowLatencyDispatchResult(NamedTuple):
    """Result of ``low_latency_dispatch``; unpacks as DeepEP's 5-tuple.

    Attributes:
        recv_x: bf16 [E_loc, R*T, H], or (float8_e4m3fn [E_loc, R*T, H], scales) with scales float32
            [E_loc, R*T, H/128] or, with UE8M0, int32 [E_loc, R*T, H/512], both column-major in their
            last two dimensions. Only the first ``recv_count[e]`` rows of expert e are valid.
        recv_count: int32 [E_loc].
        handle: :class:`LowLatencyHandle`.
        event: see :class:`EventOverlap`.
        hook: with ``return_recv_hook``, call it to complete the receive; otherwise a no-op.
    """

    recv_x: Activation
    recv_count: torch.Tensor
    handle: LowLatencyHandle
    event: EventOverlap
    hook: Callable[[], None]


class LowLatencyCombineResult(NamedTuple):
    """Result of ``low_latency_combine``: bf16 [N, H], the event and the receive hook."""

    combined_x: torch.Tensor
    event: EventOverlap
    hook: Callable[[], None]

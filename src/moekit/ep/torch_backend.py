"""The ``torch`` backend of high-throughput dispatch / combine: the definition of correct.

Built only on ``torch.distributed`` collectives (gloo on CPUs, NCCL on GPUs, any topology). It is
simple on purpose: the fast backends are checked against it. Every rank learns the full count
matrix with one ``all_gather``, then the rows of every tensor travel in one ``all_to_all_single``.
It synchronises with the host (to size the exchange), so it is not CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moekit.ep.layout import local_topk
from moekit.ep.results import DispatchHandle
from moekit.ep.rows import exchange_rows
from moekit.ep.validate import CheckedActivation


def count_matrix_from_prefix(rank_prefix_matrix: torch.Tensor) -> torch.Tensor:
    """int64 [R, R] rows sent from rank i to rank j, from the inclusive prefix over i."""
    prefix = rank_prefix_matrix.to(torch.int64)
    return torch.diff(prefix, dim=0, prepend=torch.zeros_like(prefix[:1]))


def sent_tokens(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """The token index of every row sent, grouped by destination rank, tokens in order."""
    return is_token_in_rank.t().nonzero(as_tuple=True)[1]


def round_up_counts(counts: list[int], alignment: int) -> list[int]:
    """Each count rounded up to a multiple of ``alignment`` (the per-expert list's ``expert_alignment``)."""
    return [(c + alignment - 1) // alignment * alignment for c in counts]


class TorchDispatcher:
    """High-throughput dispatch / combine over ``group`` with collectives only."""

    # Buffer checks the range of topk_idx itself (one device read) before calling dispatch.
    reads_topk_range = False

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device

    def all_gather_counts(self, num_tokens_per_rank: torch.Tensor) -> torch.Tensor:
        """int64 [R, R]: entry [i][j] = rows rank i sends to rank j."""
        mine = num_tokens_per_rank.to(torch.int64).contiguous()
        gathered = [torch.empty_like(mine) for _ in range(self.num_ranks)]
        dist.all_gather(gathered, mine, group=self.group)
        return torch.stack(gathered)

    def dispatch(self, x: CheckedActivation, *, handle: DispatchHandle | None,
                 num_tokens_per_rank: torch.Tensor | None, is_token_in_rank: torch.Tensor | None,
                 topk_idx: torch.Tensor | None, topk_weights: torch.Tensor | None, num_experts: int | None,
                 expert_alignment: int, num_worst_tokens: int, num_tokens_per_expert: torch.Tensor | None = None):
        """Returns (recv_data, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle);
        the per-expert list is counted from the received rows (``num_tokens_per_expert`` is unused)."""
        if handle is not None:
            counts = count_matrix_from_prefix(handle.rank_prefix_matrix)
            is_token_in_rank = handle.is_token_in_rank
            num_worst_tokens = handle.recv_src_idx.shape[0] if num_worst_tokens else 0
        else:
            counts = self.all_gather_counts(num_tokens_per_rank)
            own = is_token_in_rank.sum(dim=0).to(torch.int64)
            if not torch.equal(counts[self.rank], own):
                raise ValueError("num_tokens_per_rank: does not match is_token_in_rank.sum(0) on rank "
                                 f"{self.rank} ({counts[self.rank].tolist()} vs {own.tolist()})")
        received_per_rank = counts.sum(dim=0)
        if num_worst_tokens and int(received_per_rank.max()) > num_worst_tokens:
            raise ValueError(f"num_worst_tokens: {num_worst_tokens} is too small; ranks receive "
                             f"{received_per_rank.tolist()} tokens")
        token = sent_tokens(is_token_in_rank)
        payload = [x.data[token]] + ([x.scales[token]] if x.scales is not None else [])
        payload.append(token.to(torch.int32))
        if topk_idx is not None:
            payload.append(topk_idx[token])
        if topk_weights is not None:
            payload.append(topk_weights[token])
        send_counts = counts[self.rank].tolist()
        recv_counts = counts[:, self.rank].tolist()
        recv = exchange_rows(self.group, payload, send_counts, recv_counts)
        recv_data = recv.pop(0)
        recv_scales = recv.pop(0) if x.scales is not None else None
        recv_src_idx = recv.pop(0)
        recv_idx = recv.pop(0) if topk_idx is not None else None
        recv_weights = recv.pop(0) if topk_weights is not None else None

        experts_per_rank = num_experts // self.num_ranks if num_experts else 0
        if recv_idx is not None:
            recv_idx, recv_weights = local_topk(recv_idx, recv_weights, self.rank, experts_per_rank)
        per_expert_list = None
        if handle is None:
            per_expert_list = [] if num_worst_tokens else self._aligned_counts(recv_idx, experts_per_rank,
                                                                                expert_alignment)
        if num_worst_tokens:
            pad = num_worst_tokens - recv_data.shape[0]
            recv_data = _pad_rows(recv_data, pad, 0)
            recv_scales = _pad_rows(recv_scales, pad, 0)
            recv_src_idx = _pad_rows(recv_src_idx, pad, -1)
            recv_idx = _pad_rows(recv_idx, pad, -1)
            recv_weights = _pad_rows(recv_weights, pad, 0)
        new_handle = None
        if handle is None:
            prefix = counts.cumsum(dim=0).to(torch.int32)
            new_handle = DispatchHandle(prefix, recv_src_idx, is_token_in_rank)
        return recv_data, recv_scales, recv_idx, recv_weights, per_expert_list, new_handle

    @staticmethod
    def _aligned_counts(recv_idx: torch.Tensor, experts_per_rank: int, alignment: int) -> list[int]:
        slots = torch.where(recv_idx >= 0, recv_idx, experts_per_rank).flatten()
        counts = torch.zeros(experts_per_rank + 1, dtype=torch.int64, device=recv_idx.device)
        counts.index_add_(0, slots, torch.ones_like(slots))
        return round_up_counts(counts[:experts_per_rank].tolist(), alignment)

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor | None,
                biases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sums, in float32 and in rank order, the rows each token's ranks send back, then adds the biases."""
        counts = count_matrix_from_prefix(handle.rank_prefix_matrix)
        num_real = int(counts[:, self.rank].sum())
        payload = [x[:num_real]] + ([topk_weights[:num_real]] if topk_weights is not None else [])
        back = exchange_rows(self.group, payload, counts[:, self.rank].tolist(), counts[self.rank].tolist())
        token = sent_tokens(handle.is_token_in_rank)
        num_tokens = handle.is_token_in_rank.shape[0]
        sizes = counts[self.rank].tolist()
        combined = _sum_by_rank(back[0], token, sizes, (num_tokens, x.shape[1]))
        for b in biases:
            combined += b.float()
        weights = None
        if topk_weights is not None:
            weights = _sum_by_rank(back[1], token, sizes, (num_tokens, topk_weights.shape[1]))
        return combined.to(torch.bfloat16), weights


def _sum_by_rank(rows: torch.Tensor, token: torch.Tensor, sizes: list[int], shape: tuple[int, int]) -> torch.Tensor:
    """float32 sum of ``rows`` into ``shape`` by ``token``; one rank's block at a time, so the
    summation order (rank 0 first) is fixed and the result deterministic on every device."""
    out = torch.zeros(shape, dtype=torch.float32, device=rows.device)
    start = 0
    for size in sizes:
        if size:
            idx = token[start:start + size]
            out[idx] += rows[start:start + size].float()
        start += size
    return out


def _pad_rows(t: torch.Tensor | None, pad: int, value: float) -> torch.Tensor | None:
    if t is None or pad == 0:
        return t
    filler = t.new_zeros((pad, *t.shape[1:]))
    if value:
        filler.fill_(value)
    return torch.cat([t, filler])

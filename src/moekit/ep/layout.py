"""Where each token goes: the layout computed locally from top-k expert ids (no communication)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.ep.config import NUM_MAX_NVL_PEERS
from moekit.ep.events import EventOverlap


class DispatchLayout(NamedTuple):
    """Result of ``get_dispatch_layout`` (unpacks as DeepEP's 5-tuple).

    Attributes:
        num_tokens_per_rank: int32 [R], tokens this rank sends to each rank (once per rank, however
            many of the token's experts live there).
        num_tokens_per_rdma_rank: int32 [ceil(R/8)] tokens per host of 8 ranks, or ``None`` when every
            rank is on one host.
        num_tokens_per_expert: int32 [E], (token, slot) pairs that chose each expert.
        is_token_in_rank: bool [N, R], whether token n goes to rank r.
        event: the event after the computation (meaningful with ``async_finish``).
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_rdma_rank: torch.Tensor | None
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor
    event: EventOverlap


def token_ranks(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """bool [N, R]: does token n pick at least one expert held by rank r (-1 slots ignored)."""
    experts_per_rank = num_experts // num_ranks
    n = topk_idx.shape[0]
    # Empty slots go to an extra column that is dropped, which keeps this free of host syncs.
    dest = torch.where(topk_idx >= 0, topk_idx // experts_per_rank, num_ranks)
    hit = torch.zeros(n, num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
    hit.scatter_(1, dest, True)
    return hit[:, :num_ranks]


def compute_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> tuple[
        torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank)."""
    is_token_in_rank = token_ranks(topk_idx, num_experts, num_ranks)
    num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    slots = torch.where(topk_idx >= 0, topk_idx, num_experts).flatten()
    per_expert.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
    num_tokens_per_rdma_rank = None
    if num_ranks > NUM_MAX_NVL_PEERS:
        nodes = (num_ranks + NUM_MAX_NVL_PEERS - 1) // NUM_MAX_NVL_PEERS
        padded = torch.nn.functional.pad(is_token_in_rank, (0, nodes * NUM_MAX_NVL_PEERS - num_ranks))
        num_tokens_per_rdma_rank = padded.unflatten(1, (nodes, NUM_MAX_NVL_PEERS)).any(dim=2).sum(
            dim=0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, per_expert[:num_experts], is_token_in_rank


def local_topk(topk_idx: torch.Tensor, topk_weights: torch.Tensor | None, rank: int,
               experts_per_rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global expert ids to this rank's local ids; slots of other ranks (or -1) become -1, weight 0."""
    local = topk_idx - rank * experts_per_rank
    mine = (topk_idx >= 0) & (local >= 0) & (local < experts_per_rank)
    local = torch.where(mine, local, torch.full_like(local, -1))
    if topk_weights is None:
        return local, None
    return local, torch.where(mine, topk_weights, torch.zeros_like(topk_weights))

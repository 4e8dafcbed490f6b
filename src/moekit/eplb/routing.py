"""Routing to replicas: logical top-k expert ids to physical expert ids, in torch on any device.

``static``: a token goes to a replica on its own rank when the expert has one there; otherwise the
ranks without a local replica are spread over the expert's replicas in turn, replicas that no rank
uses locally first (a fixed table per placement, so routing is one gather). ``round_robin``: the n-th occurrence of an expert among the
routed ids goes to replica ``(n + offset) % count``, so replicas receive counts within one of each other.
Entries of -1 (masked top-k slots) stay -1.
"""

from __future__ import annotations

from typing import Literal

import torch

from moekit.eplb.indexing import occurrence_rank

RouteMode = Literal["static", "round_robin"]


def static_table(log2phy: torch.Tensor, logcnt: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """The ``static`` choice of replica for every (rank, expert) of one layer.

    Args:
        log2phy: int64 [E, M], physical ids of each expert's replicas, -1 padded.
        logcnt: int64 [E], replicas per expert.
        num_ranks: ranks (GPUs) holding the ``R`` physical experts, ``R / num_ranks`` each in order.

    Returns int64 [num_ranks, E]: the physical expert a token on that rank uses for that expert.
    """
    _check_placement(log2phy, logcnt)
    num_physical = int(log2phy.max()) + 1
    slots_per_rank = -(-num_physical // num_ranks)
    device = log2phy.device
    valid = torch.arange(log2phy.shape[1], device=device) < logcnt.unsqueeze(-1)          # [E, M]
    ranks = torch.arange(num_ranks, device=device).view(-1, 1, 1)
    local = valid & (log2phy.div(slots_per_rank, rounding_mode="floor") == ranks)       # [G, E, M]
    has_local = local.any(-1)                                                             # [G, E]
    local_choice = local.long().argmax(-1)
    # replicas no rank uses locally come first, so that remote ranks land where traffic is lowest
    local_users = torch.zeros_like(log2phy).scatter_add_(1, local_choice.t(), has_local.long().t())
    key = torch.where(valid, local_users, torch.full_like(local_users, num_ranks + 1))
    preference = key.sort(dim=-1, stable=True).indices                                  # [E, M]
    # ranks without a local replica take the expert's replicas in turn, in rank order
    remote_index = (~has_local).long().cumsum(0) - 1
    remote_choice = preference.gather(1, (remote_index % logcnt).t()).t()
    replica = torch.where(has_local, local_choice, remote_choice)
    return log2phy.gather(1, replica.t()).t()


def logical_to_physical(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, *,
                        mode: RouteMode = "static", rank: int = 0, table: torch.Tensor | None = None,
                        num_ranks: int | None = None, offset: int = 0) -> torch.Tensor:
    """Maps logical expert ids to physical expert ids for one layer.

    Args:
        topk_ids: integer [..., K] logical ids (or -1) of the tokens on ``rank``.
        log2phy: int64 [E, M], -1 padded; logcnt: int64 [E].
        mode: ``"static"`` or ``"round_robin"``.
        rank: the rank the tokens are on (``static``).
        table: :func:`static_table` of this placement, to skip rebuilding it per call (``static``).
        num_ranks: ranks of the placement (``static`` without ``table``).
        offset: where each expert's round starts (``round_robin``), e.g. a step counter.

    Returns int64 with ``topk_ids``' shape on its device.
    """
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise TypeError("topk_ids must be an integer torch.Tensor of logical expert ids")
    ids = topk_ids.long()
    masked = ids < 0
    safe = ids.clamp(min=0)
    if mode == "static":
        if table is None:
            if num_ranks is None:
                raise ValueError("static routing needs table or num_ranks")
            table = static_table(log2phy, logcnt, num_ranks)
        if not 0 <= rank < table.shape[0]:
            raise ValueError(f"rank must be in [0, {table.shape[0]}), got {rank}")
        physical = table[rank][safe]
    elif mode == "round_robin":
        _check_placement(log2phy, logcnt)
        # masked slots get an id of their own, so they advance no expert's round
        counted = torch.where(masked, torch.full_like(ids, logcnt.shape[0]), ids)
        nth = occurrence_rank(counted.reshape(1, -1)).view_as(ids)
        replica = (nth + offset) % logcnt[safe]
        physical = log2phy[safe, replica]
    else:
        raise ValueError(f"mode must be 'static' or 'round_robin', got {mode!r}")
    return torch.where(masked, ids, physical)


def _check_placement(log2phy: torch.Tensor, logcnt: torch.Tensor) -> None:
    if log2phy.dim() != 2 or logcnt.dim() != 1 or log2phy.shape[0] != logcnt.shape[0]:
        raise ValueError(f"log2phy must be [E, M] and logcnt [E] of one layer, got shapes "
                         f"{tuple(log2phy.shape)} and {tuple(logcnt.shape)}")

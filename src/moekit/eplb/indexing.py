"""Index arithmetic shared by the placement, migration and routing code (all devices)."""

from __future__ import annotations

import torch


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of permutations ``perm`` int64 [X, n]."""
    inv = torch.empty_like(perm)
    return inv.scatter_(1, perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm))


def occurrence_rank(ids: torch.Tensor) -> torch.Tensor:
    """For each entry of ``ids`` int64 [X, n], how many equal entries precede it in its row (int64 [X, n])."""
    rows, n = ids.shape
    if n == 0:
        return torch.zeros_like(ids)
    sorted_ids, order = ids.sort(dim=-1, stable=True)
    position = torch.arange(n, device=ids.device).expand(rows, n)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    # position of the first entry of each run of equal ids, carried forward along the row
    run_start = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=-1).values
    rank = torch.empty_like(ids)
    return rank.scatter_(1, order, position - run_start)

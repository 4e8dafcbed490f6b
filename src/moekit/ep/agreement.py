"""Checking that every rank passed the same sizes, so that a mismatch is an error, not a hang."""

from __future__ import annotations

import torch
import torch.distributed as dist


def check_agreement(group: dist.ProcessGroup, op: str, values: dict[str, int], device: torch.device) -> None:
    """Raises ``ValueError`` on every rank if the ranks passed different ``values`` to ``op``.

    Fixed-shape exchanges with mismatched shapes would hang or corrupt data; one small all-gather
    turns that into an error that lists each rank's values.
    """
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return  # checked by the eager call that preceded capture
    mine = torch.tensor(list(values.values()), dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    rows = torch.stack(table).cpu()
    if not bool((rows == rows[0]).all()):
        names = list(values)
        detail = "; ".join(f"rank {r}: " + ", ".join(f"{n}={v}" for n, v in zip(names, row.tolist()))
                           for r, row in enumerate(rows))
        raise ValueError(f"{op}: ranks disagree on {', '.join(names)} ({detail}); every rank must pass the same")

"""Replication: how many copies of each logical expert, so that the heaviest copy is as light as possible."""

from __future__ import annotations

import numpy as np
import torch


def replicate_experts(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turns ``num_log`` logical experts into ``num_physical`` copies, one added at a time.

    Every expert starts with one copy (physical id = logical id); each further copy goes to the
    expert with the highest float32 ``weight / count``, ties to the lowest expert index. One tensor
    step per added copy serves all rows at once.

    Args:
        weight: [X, num_log] loads (float32 is used).
        num_physical: total copies, ``>= num_log``.

    Returns:
        phy2log: int64 [X, num_physical], the logical expert of each copy.
        rank: int64 [X, num_physical], the replica rank of each copy within its expert.
        logcnt: int64 [X, num_log], copies per logical expert.
    """
    rows, num_log = weight.shape
    # numpy: a step touches one value per row, where torch's per-op overhead would dominate
    w = weight.detach().float().cpu().numpy()
    row = np.arange(rows)
    phy2log = np.tile(np.arange(num_physical, dtype=np.int64), (rows, 1))
    rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, num_log), dtype=np.int64)
    for p in range(num_log, num_physical):
        # float32 division, as the published algorithm computes it
        expert = (w / logcnt.astype(np.float32)).argmax(axis=-1)
        phy2log[:, p] = expert
        rank[:, p] = logcnt[row, expert]
        logcnt[row, expert] += 1
    return tuple(torch.from_numpy(a).to(weight.device) for a in (phy2log, rank, logcnt))

"""Balance of a placement: the load each GPU gets when an expert's tokens split evenly over its replicas."""

from __future__ import annotations

import torch


def replica_counts(phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Replicas per logical expert, int64 [L, num_experts], from ``phy2log`` int64 [L, R]."""
    counts = torch.zeros(phy2log.shape[0], num_experts, dtype=torch.int64, device=phy2log.device)
    return counts.scatter_add_(1, phy2log, torch.ones_like(phy2log))


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load of each GPU, float64 [L, num_gpus].

    Args:
        weight: [L, E] logical expert loads (any numeric dtype).
        phy2log: int64 [L, R], the logical expert of each physical slot; slot p is on GPU
            ``p // (R / num_gpus)``.
        num_gpus: number of GPUs, dividing R.
    """
    w = weight.double()
    counts = replica_counts(phy2log, w.shape[1])
    per_replica = (w / counts.clamp(min=1)).gather(1, phy2log)
    return per_replica.view(phy2log.shape[0], num_gpus, -1).sum(-1)


def imbalance(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Max GPU load over mean GPU load per layer, float64 [L]; 1.0 for a layer with no load."""
    loads = gpu_loads(weight, phy2log, num_gpus)
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.max(-1).values / mean.clamp(min=torch.finfo(torch.float64).tiny),
                       torch.ones_like(mean))

"""Expert-parallel load balancer: which logical expert each physical slot of each GPU holds.

Hierarchical policy (when expert groups divide evenly over nodes): pack groups onto nodes, replicate
experts within each node, pack each node's replicas onto its GPUs. Global policy otherwise: the same
with one group and one node. Physical expert ``p`` sits on GPU ``p // (R / num_gpus)``.

Modes:
    ``greedy``: DeepSeek EPLB's published algorithm, reproduced exactly.
    ``refined`` (default): the same pipeline, then swaps between GPUs that lower each node's heaviest
        GPU; a swap is only taken when it lowers it, so the maximum GPU load never exceeds greedy's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from moekit.eplb.indexing import inverse_permutation
from moekit.eplb.packing import balanced_packing, refine_packing
from moekit.eplb.replication import replicate_experts

Mode = Literal["refined", "greedy"]
MODES: tuple[str, ...] = ("refined", "greedy")


@dataclass(frozen=True)
class Topology:
    """Where replicas go: ``num_replicas`` physical slots over ``num_gpus`` GPUs in ``num_nodes`` nodes."""

    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    def __post_init__(self) -> None:
        for name in ("num_replicas", "num_groups", "num_nodes", "num_gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.num_replicas % self.num_gpus:
            raise ValueError(f"num_replicas ({self.num_replicas}) must be a multiple of num_gpus ({self.num_gpus})")
        if self.num_gpus % self.num_nodes:
            raise ValueError(f"num_gpus ({self.num_gpus}) must be a multiple of num_nodes ({self.num_nodes})")

    @property
    def hierarchical(self) -> bool:
        """Groups fit whole onto nodes, so the hierarchical policy applies."""
        return self.num_groups % self.num_nodes == 0

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    def check_experts(self, num_experts: int) -> None:
        """Raises ``ValueError`` if ``num_experts`` logical experts cannot be placed on this topology."""
        if self.num_replicas < num_experts:
            raise ValueError(f"num_replicas ({self.num_replicas}) must be >= the number of experts ({num_experts})")
        if self.hierarchical and num_experts % self.num_groups:
            raise ValueError(f"the number of experts ({num_experts}) must be a multiple of num_groups "
                             f"({self.num_groups}) for the hierarchical policy")


def check_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """Checks a load matrix: a 2-D, non-empty, real tensor of finite non-negative values."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [layers, experts], got {type(weight).__name__}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor [layers, experts], got shape {tuple(weight.shape)}")
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(f"{name} must be a real numeric tensor, got dtype {weight.dtype}")
    w = weight.detach().double()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must hold finite, non-negative loads")
    return weight


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, *, mode: Mode = "refined") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Places ``num_replicas`` physical experts on ``num_gpus`` GPUs so that GPU loads are balanced.

    Args:
        weight: [L, E] load of each logical expert in each layer (any real dtype, finite, >= 0).
        num_replicas: R, physical experts per layer, a multiple of ``num_gpus`` and ``>= E``.
        num_groups: expert groups (E a multiple of it when the hierarchical policy applies).
        num_nodes: server nodes; ``num_gpus`` must be a multiple of it.
        num_gpus: GPUs; physical expert ``p`` sits on GPU ``p // (R / num_gpus)``.
        mode: ``"refined"`` (default) or ``"greedy"`` (the published algorithm, exactly).

    Returns:
        phy2log: int64 [L, R], the logical expert of each physical expert.
        log2phy: int64 [L, E, max replicas], the physical experts of each logical expert by replica
            rank, padded with -1.
        logcnt: int64 [L, E], replicas per logical expert.
    All on ``weight``'s device.
    """
    weight = check_weight(weight)
    topo = Topology(num_replicas, num_groups, num_nodes, num_gpus)
    topo.check_experts(weight.shape[1])
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    phy2log, phyrank, logcnt = place(weight.detach().float().cpu(), topo, refine=mode == "refined")
    log2phy = build_log2phy(phy2log, phyrank, logcnt)
    return phy2log.to(weight.device), log2phy.to(weight.device), logcnt.to(weight.device)


def place(weight: torch.Tensor, topo: Topology, *, refine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the policy that ``topo`` selects on float32 ``weight`` [L, E].

    Returns ``(phy2log, phyrank, logcnt)``: int64 [L, R], [L, R] (replica rank of each physical
    expert) and [L, E].
    """
    groups, nodes = (topo.num_groups, topo.num_nodes) if topo.hierarchical else (1, 1)
    return _hierarchical(weight, topo.num_replicas, groups, nodes, topo.num_gpus, refine)


def build_log2phy(phy2log: torch.Tensor, phyrank: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """int64 [L, E, max replicas]: entry ``[l, e, r]`` is the physical expert of replica ``r`` of ``e``, else -1."""
    layers, experts = logcnt.shape
    width = int(logcnt.max())
    log2phy = torch.full((layers, experts * width), -1, dtype=torch.int64, device=phy2log.device)
    slots = torch.arange(phy2log.shape[1], device=phy2log.device).expand_as(phy2log)
    log2phy.scatter_(1, phy2log * width + phyrank, slots)
    return log2phy.view(layers, experts, width)


def _hierarchical(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                  refine: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layers, experts = weight.shape
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_replicas // num_gpus
    experts_per_node = experts // num_nodes
    device = weight.device

    # 1. groups to nodes; "node-major" ids list node 0's experts first, then node 1's, ...
    group_load = weight.view(layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    first = (group_pack * groups_per_node + group_rank) * group_size
    log2mlog = (first.unsqueeze(-1) + torch.arange(group_size, device=device)).flatten(1)
    mlog2log = inverse_permutation(log2mlog)

    # 2. replicas within each node: rows are (layer, node)
    node_w = weight.gather(1, mlog2log).view(layers * num_nodes, experts_per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(node_w, num_replicas // num_nodes)

    # 3. each node's replicas to its GPUs
    replica_w = (node_w / mlogcnt).gather(1, phy2mlog)
    pack, rank = balanced_packing(replica_w, gpus_per_node)
    if refine:
        # float64 loads, so that a swap is judged as the balance is measured
        replica_w64 = (node_w.double() / mlogcnt).gather(1, phy2mlog)
        pack, rank = refine_packing(replica_w64, pack, rank, gpus_per_node)
    pphy2phy = inverse_permutation(pack * slots_per_gpu + rank)

    node_base = (torch.arange(num_nodes, device=device) * experts_per_node).view(1, -1, 1)
    pphy2mlog = (phy2mlog.gather(1, pphy2phy).view(layers, num_nodes, -1) + node_base).flatten(1)
    phy2log = mlog2log.gather(1, pphy2mlog)
    phy_rank = phyrank.gather(1, pphy2phy).view(layers, -1)
    logcnt = mlogcnt.view(layers, -1).gather(1, log2mlog)
    return phy2log, phy_rank, logcnt

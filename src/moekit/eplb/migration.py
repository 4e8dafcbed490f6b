"""Migration-aware rebalancing: a balanced placement that moves few expert weights from the current one.

A physical slot whose logical expert changes needs that expert's weights copied in: one move. The
candidates per layer are the current placement (no moves), and the refined and greedy placements
relabelled to keep as many experts where they already are (nodes, then GPUs within a node, then
slots within a GPU, matched greedily by overlap; relabelling never changes GPU loads, only their
order). Among the candidates whose max GPU load is within ``tolerance`` of the best, the one with
the fewest moves wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.eplb.indexing import occurrence_rank
from moekit.eplb.metrics import gpu_loads, replica_counts
from moekit.eplb.policy import Topology, build_log2phy, check_weight, place


@dataclass
class MigrationPlan:
    """A placement chosen with its migration cost.

    phy2log: int64 [L, R]; log2phy: int64 [L, E, max replicas] (-1 padded); logcnt: int64 [L, E];
    moves: int64 [L], physical slots per layer whose expert changes; max_load: float64 [L], the max
    GPU load of the chosen placement; best_max_load: float64 [L], the lowest max GPU load found.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    moves: torch.Tensor
    max_load: torch.Tensor
    best_max_load: torch.Tensor


def rebalance_with_migration(current_phy2log: torch.Tensor, weight: torch.Tensor, num_replicas: int,
                             num_groups: int, num_nodes: int, num_gpus: int, *,
                             tolerance: float = 0.05) -> MigrationPlan:
    """Rebalances for ``weight`` while preferring placements close to ``current_phy2log``.

    Args:
        current_phy2log: int64 [L, R], the placement in service (values in ``[0, E)``).
        weight: [L, E] observed loads (any real dtype, finite, >= 0).
        num_replicas, num_groups, num_nodes, num_gpus: as for :func:`rebalance_experts`.
        tolerance: a placement whose max GPU load is at most ``(1 + tolerance)`` times the best is
            acceptable; the acceptable one with the fewest moves is chosen (per layer).

    Returns a :class:`MigrationPlan` on ``weight``'s device.
    """
    weight = check_weight(weight)
    topo = Topology(num_replicas, num_groups, num_nodes, num_gpus)
    layers, experts = weight.shape
    topo.check_experts(experts)
    if not isinstance(current_phy2log, torch.Tensor) or current_phy2log.dtype.is_floating_point \
            or current_phy2log.dtype == torch.bool:
        raise TypeError("current_phy2log must be an integer torch.Tensor [layers, num_replicas]")
    if tuple(current_phy2log.shape) != (layers, num_replicas):
        raise ValueError(f"current_phy2log must have shape {(layers, num_replicas)}, got {tuple(current_phy2log.shape)}")
    current = current_phy2log.detach().long().cpu()
    if bool(((current < 0) | (current >= experts)).any()):
        raise ValueError(f"current_phy2log values must be logical expert ids in [0, {experts})")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")

    w = weight.detach().float().cpu()
    nodes = topo.num_nodes if topo.hierarchical else 1
    candidates = [current]
    for refine in (True, False):
        phy2log = place(w, topo, refine=refine)[0]
        candidates.append(align(phy2log, current, nodes, topo.num_gpus))
    phy2logs = torch.stack(candidates)                                          # [C, L, R]
    max_load = torch.stack([gpu_loads(w, c, num_gpus).max(-1).values for c in candidates])
    # the current placement is no candidate for a layer where some expert has no replica
    covered = (replica_counts(current, experts) > 0).all(-1)
    max_load[0] = torch.where(covered, max_load[0], torch.full_like(max_load[0], float("inf")))
    best = max_load.min(0).values
    moves = (phy2logs != current).sum(-1)                                      # [C, L]
    acceptable = max_load <= best * (1 + tolerance)
    choice = torch.where(acceptable, moves, torch.full_like(moves, num_replicas + 1)).argmin(0)
    layer = torch.arange(layers)
    chosen = phy2logs[choice, layer]
    logcnt = replica_counts(chosen, experts)
    log2phy = build_log2phy(chosen, occurrence_rank(chosen), logcnt)
    device = weight.device
    return MigrationPlan(chosen.to(device), log2phy.to(device), logcnt.to(device),
                         moves[choice, layer].to(device), max_load[choice, layer].to(device), best.to(device))


def align(phy2log: torch.Tensor, current: torch.Tensor, num_nodes: int, num_gpus: int) -> torch.Tensor:
    """Relabels nodes, GPUs within nodes and slots within GPUs of ``phy2log`` [L, R] to match ``current``.

    The relabelled placement has the same GPU loads as ``phy2log`` (permuted) and keeps every
    replica group on its node; it maximises, greedily, the slots whose expert stays the same.
    """
    layers, slots = phy2log.shape
    experts = int(max(phy2log.max(), current.max())) + 1
    per_gpu = slots // num_gpus
    gpus_per_node = num_gpus // num_nodes
    out = torch.empty_like(phy2log)
    for l in range(layers):
        new_hist = replica_counts(phy2log[l].view(num_gpus, per_gpu), experts)  # [G, E]
        cur_hist = replica_counts(current[l].view(num_gpus, per_gpu), experts)
        node_new = new_hist.view(num_nodes, gpus_per_node, experts).sum(1)
        node_cur = cur_hist.view(num_nodes, gpus_per_node, experts).sum(1)
        node_match = _greedy_match(torch.minimum(node_new[:, None], node_cur[None]).sum(-1))
        for new_node, cur_node in enumerate(node_match.tolist()):
            new_gpus = torch.arange(gpus_per_node) + new_node * gpus_per_node
            cur_gpus = torch.arange(gpus_per_node) + cur_node * gpus_per_node
            overlap = torch.minimum(new_hist[new_gpus][:, None], cur_hist[cur_gpus][None]).sum(-1)
            for new_gpu, cur_local in zip(new_gpus.tolist(), _greedy_match(overlap).tolist()):
                cur_gpu = cur_node * gpus_per_node + cur_local
                span = slice(cur_gpu * per_gpu, (cur_gpu + 1) * per_gpu)
                out[l, span] = _arrange(phy2log[l, new_gpu * per_gpu:(new_gpu + 1) * per_gpu], current[l, span])
    return out


def _greedy_match(overlap: torch.Tensor) -> torch.Tensor:
    """Pairs rows with columns of a square ``overlap`` [n, n], largest overlap first; int64 [n] column per row."""
    n = overlap.shape[0]
    score = overlap.double().clone()
    match = torch.empty(n, dtype=torch.int64)
    for _ in range(n):
        flat = int(score.argmax())
        r, c = divmod(flat, n)
        match[r] = c
        score[r, :] = -1
        score[:, c] = -1
    return match


def _arrange(new: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Orders the experts ``new`` [S] of one GPU so that those also in ``cur`` [S] keep their slot."""
    remaining = new.tolist()
    out: list[int | None] = [None] * len(remaining)
    for slot, expert in enumerate(cur.tolist()):
        if expert in remaining:
            remaining.remove(expert)
            out[slot] = expert
    fill = iter(remaining)
    return torch.tensor([e if e is not None else next(fill) for e in out], dtype=new.dtype)

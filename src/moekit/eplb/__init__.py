"""Expert-parallel load balancing (EPLB): replicate heavy experts and place replicas on GPUs.

- :func:`rebalance_experts`: loads [L, E] -> ``phy2log`` [L, R], ``log2phy`` [L, E, max replicas]
  (-1 padded), ``logcnt`` [L, E]; ``mode="greedy"`` is DeepSeek EPLB's published algorithm,
  the default ``"refined"`` never has a larger max GPU load.
- :func:`rebalance_with_migration`: the same, preferring placements that move few expert weights.
- :func:`logical_to_physical` / :func:`static_table`: route top-k logical ids to replicas.
- :class:`ExpertLoadRecorder`: sliding-window loads fed by dispatch counts.
- :func:`gpu_loads` / :func:`imbalance`: how balanced a placement is.
"""

from __future__ import annotations

from moekit.eplb.metrics import gpu_loads, imbalance, replica_counts
from moekit.eplb.migration import MigrationPlan, rebalance_with_migration
from moekit.eplb.policy import MODES, Topology, rebalance_experts
from moekit.eplb.recorder import ExpertLoadRecorder
from moekit.eplb.routing import logical_to_physical, static_table

__all__ = [
    "MODES", "ExpertLoadRecorder", "MigrationPlan", "Topology", "gpu_loads", "imbalance", "logical_to_physical",
    "rebalance_experts", "rebalance_with_migration", "replica_counts", "static_table",
]

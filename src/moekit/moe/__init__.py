"""Mixture-of-Experts layers built on moekit's expert-parallel communication."""

from moekit.moe.layer import ExpertParallelMoE, MoEConfig, Router, SwiGLUExperts, build_full_layer, moe_reference

__all__ = ["ExpertParallelMoE", "MoEConfig", "Router", "SwiGLUExperts", "build_full_layer", "moe_reference"]

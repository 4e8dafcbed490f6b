"""moekit: Mixture-of-Experts infrastructure (expert-parallel communication, load balancing, grouped GEMM)."""

__version__ = "0.1.0"

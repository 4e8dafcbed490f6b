"""Grouped GEMMs for MoE experts in Triton, bf16 and FP8 with DeepSeek's fine-grained scaling.

* :func:`m_grouped_gemm_contiguous`: experts' rows back to back (high-throughput dispatch layout).
* :func:`m_grouped_gemm_masked`: fixed [G, M_max, K] slabs with valid row counts (low-latency layout).
* :func:`gemm_fp8_nt`: dense FP8 GEMM with the same scaling.
* The FP8 casts that produce the operands, from :mod:`moekit.fp8`.

DeepGEMM's names and argument orders are in :mod:`moekit.compat.deep_gemm`.
"""

from __future__ import annotations

from moekit.fp8 import per_block_cast_back, per_block_cast_to_fp8, per_token_cast_back, per_token_cast_to_fp8
from moekit.gemm.api import gemm_fp8_nt, get_m_alignment, m_grouped_gemm_contiguous, m_grouped_gemm_masked

__all__ = [
    "gemm_fp8_nt", "get_m_alignment", "m_grouped_gemm_contiguous", "m_grouped_gemm_masked",
    "per_block_cast_back", "per_block_cast_to_fp8", "per_token_cast_back", "per_token_cast_to_fp8",
]

"""DeepGEMM's names and argument orders over :mod:`moekit.gemm`, for code written against DeepGEMM.

``import moekit.compat.deep_gemm as deep_gemm`` then ``deep_gemm.m_grouped_fp8_gemm_nt_contiguous(
(a, sfa), (b, sfb), d, m_indices)`` and so on. Scale tensors are accepted in the layouts DeepGEMM
takes: float32 in any strides (row-major as cast, or the MN-major, TMA-aligned copies that DeepGEMM
builds), per-row weight scales ``[..., N, K/128]`` (constant over each 128 rows), and UE8M0 exponents
packed four per int32 along K (``sfa [..., M, ceil(K/512)]``, ``sfb [..., N, ceil(K/512)]``).
``recipe`` must be DeepSeek's ``(1, 128, 128)`` (or None); ``compiled_dims`` and
``disable_ue8m0_cast`` are accepted and have no effect (Triton specialises on shapes itself, and
scales are used as given).
"""

from __future__ import annotations

from typing import Optional

import torch

from moekit.fp8 import GROUP, unpack_ue8m0
from moekit.gemm.api import gemm_fp8_nt, get_m_alignment, m_grouped_gemm_contiguous, m_grouped_gemm_masked

FP8Pair = tuple[torch.Tensor, torch.Tensor]


def get_mk_alignment_for_contiguous_layout() -> int:
    """Row alignment of each expert's block in the contiguous layout (128)."""
    return get_m_alignment()


get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout


def _check_recipe(recipe: Optional[tuple[int, int, int]]) -> None:
    if recipe is not None and tuple(recipe) != (1, GROUP, GROUP):
        raise ValueError(f"recipe: only (1, {GROUP}, {GROUP}) scaling is supported, got {recipe}")


def _act_scales(sf: torch.Tensor, k: int) -> torch.Tensor:
    """float32 [..., M, K/128] from float32 (any strides) or packed UE8M0 int32 [..., M, ceil(K/512)]."""
    return unpack_ue8m0(sf, k // GROUP) if sf.dtype == torch.int32 else sf


def _weight_scales(sf: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """float32 [..., ceil(N/128), K/128] from block scales, per-row scales [..., N, K/128] or packed UE8M0."""
    if sf.dtype == torch.int32:
        sf = unpack_ue8m0(sf, k // GROUP)
    if sf.dim() >= 2 and sf.shape[-2] == n and n != -(-n // GROUP):
        sf = sf[..., ::GROUP, :]
    return sf


def _fp8(a: FP8Pair, b: FP8Pair) -> tuple[FP8Pair, FP8Pair]:
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, (tuple, list)) or len(x) != 2:
            raise TypeError(f"{name}: expected a pair (float8_e4m3fn data, scales)")
    k, n = a[0].shape[-1], b[0].shape[-2]
    return (a[0], _act_scales(a[1], k)), (b[0], _weight_scales(b[1], n, k))


def fp8_gemm_nt(a: FP8Pair, b: FP8Pair, d: torch.Tensor, c: Optional[torch.Tensor] = None,
                recipe: Optional[tuple[int, int, int]] = None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False) -> None:
    """``d = a @ b.T``: a (e4m3 [M, K], sfa), b (e4m3 [N, K], sfb), d bf16 [M, N]. ``c`` (adding an
    fp32 matrix) is not supported."""
    if c is not None:
        raise ValueError("c: accumulating into an fp32 matrix is not supported; pass c=None")
    _check_recipe(recipe)
    gemm_fp8_nt(*_fp8(a, b), d)


def m_grouped_fp8_gemm_nt_contiguous(a: FP8Pair, b: FP8Pair, d: torch.Tensor, m_indices: torch.Tensor,
                                     recipe: Optional[tuple[int, int, int]] = None, compiled_dims: str = "nk",
                                     disable_ue8m0_cast: bool = False) -> None:
    """Contiguous layout: a (e4m3 [M_sum, K], sfa), b (e4m3 [G, N, K], sfb), d bf16 [M_sum, N],
    m_indices int32 [M_sum] (-1 rows are left untouched)."""
    _check_recipe(recipe)
    m_grouped_gemm_contiguous(*_fp8(a, b), d, m_indices)


def m_grouped_fp8_gemm_nt_masked(a: FP8Pair, b: FP8Pair, d: torch.Tensor, masked_m: torch.Tensor,
                                 expected_m: int, recipe: Optional[tuple[int, int, int]] = None,
                                 compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """Masked layout: a (e4m3 [G, M_max, K], sfa), b (e4m3 [G, N, K], sfb), d bf16 [G, M_max, N],
    masked_m int32 [G]."""
    _check_recipe(recipe)
    m_grouped_gemm_masked(*_fp8(a, b), d, masked_m, expected_m)


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, m_indices: torch.Tensor,
                                      compiled_dims: str = "nk") -> None:
    """Contiguous layout in bf16: a [M_sum, K], b [G, N, K], d [M_sum, N], m_indices int32 [M_sum]."""
    m_grouped_gemm_contiguous(a, b, d, m_indices)


def m_grouped_bf16_gemm_nt_masked(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, masked_m: torch.Tensor,
                                  expected_m: int, compiled_dims: str = "nk") -> None:
    """Masked layout in bf16: a [G, M_max, K], b [G, N, K], d [G, M_max, N], masked_m int32 [G]."""
    m_grouped_gemm_masked(a, b, d, masked_m, expected_m)

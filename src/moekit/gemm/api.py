"""Grouped and dense GEMMs for MoE experts: argument checks, tile choice, launch.

An operand is either a bf16 tensor or an FP8 pair ``(data float8_e4m3fn, scales float32)`` with
DeepSeek's scaling: activations (``a``) one scale per token per 128 channels, weights (``b``) one
per 128 x 128 block (see :mod:`moekit.fp8`). Both operands of a call are of the same kind. Every
product is ``out = a @ b[g].T`` ("NT": both operands K-major), accumulated in fp32, stored as bf16.
"""

from __future__ import annotations

from typing import Union

import torch

from moekit.gemm import config as tiles
from moekit.gemm.kernel import CONTIGUOUS, DENSE, MASKED, launch, num_programs

Operand = Union[torch.Tensor, "tuple[torch.Tensor, torch.Tensor]"]
K_GROUP = 128


def get_m_alignment() -> int:
    """Row alignment of each expert's block in the contiguous layout (128)."""
    return tiles.M_ALIGNMENT


def _split(name: str, x: Operand) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise TypeError(f"{name}: expected a bf16 tensor or a pair (float8_e4m3fn data, float32 scales)")
        data, scales = x
        if data.dtype != torch.float8_e4m3fn:
            raise TypeError(f"{name}: FP8 data must be torch.float8_e4m3fn, got {data.dtype}")
        if scales.dtype != torch.float32:
            raise TypeError(f"{name}: FP8 scales must be float32, got {scales.dtype}")
        return data, scales
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name}: expected a bf16 tensor or a pair (float8_e4m3fn data, float32 scales), got {got}")
    return x, None


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _operands(a: Operand, b: Operand, out: torch.Tensor, a_dims: int, b_dims: int):
    """Common checks; returns (a, sa, b, sb, K) with b always 3-D [G, N, K] and sb [G, ceil(N/128), K/128]."""
    a_data, sa = _split("a", a)
    b_data, sb = _split("b", b)
    if (sa is None) != (sb is None):
        raise TypeError("a and b must both be bf16 tensors or both FP8 (data, scales) pairs")
    if a_data.dim() != a_dims:
        raise ValueError(f"a: expected {a_dims} dimensions, got shape {tuple(a_data.shape)}")
    if b_data.dim() != b_dims:
        raise ValueError(f"b: expected {b_dims} dimensions, got shape {tuple(b_data.shape)}")
    k = a_data.shape[-1]
    if k == 0 or k % K_GROUP != 0:
        raise ValueError(f"a: K = {k} must be a positive multiple of {K_GROUP}")
    if b_data.shape[-1] != k:
        raise ValueError(f"b: K = {b_data.shape[-1]} does not match a's K = {k}")
    if out.dtype != torch.bfloat16:
        raise TypeError(f"out: expected bfloat16, got {out.dtype}")
    devices = {t.device for t in (a_data, b_data, out) + ((sa, sb) if sa is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    for name, t in (("a", a_data), ("b", b_data)):
        if not t.is_contiguous() or t.data_ptr() % 16 != 0:
            raise ValueError(f"{name}: must be contiguous with a 16-byte aligned start (TMA loads)")
    b3 = b_data if b_dims == 3 else b_data.unsqueeze(0)
    if sa is not None:
        _check_shape("a scales", sa, tuple(a_data.shape[:-1]) + (k // K_GROUP,))
        _check_shape("b scales", sb, tuple(b_data.shape[:-2]) + (-(-b_data.shape[-2] // K_GROUP), k // K_GROUP))
        sb = sb if b_dims == 3 else sb.unsqueeze(0)
    return a_data, sa, b3, sb, k


def _checking(validate: bool, t: torch.Tensor) -> bool:
    """Content checks read index tensors back to the host: skipped when asked or inside CUDA-graph capture."""
    return validate and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _config(fp8: bool, rows_hint: int, n: int, tiles_m_per_block: int, device: torch.device,
            contiguous: bool = False) -> tiles.TileConfig:
    # Tile count with 128-row tiles; only used to decide whether narrower N tiles are needed.
    return tiles.select(fp8, rows_hint, n, tiles_m_per_block, num_programs(device), contiguous)


def m_grouped_gemm_contiguous(a: Operand, b: Operand, out: torch.Tensor, m_indices: torch.Tensor, *,
                              validate: bool = True) -> torch.Tensor:
    """Grouped GEMM over experts laid out back to back: ``out[r] = a[r] @ b[m_indices[r]].T``.

    a: bf16 [M_sum, K] or (float8_e4m3fn [M_sum, K], float32 [M_sum, K/128]); b: bf16 [G, N, K] or
    (float8_e4m3fn [G, N, K], float32 [G, ceil(N/128), K/128]); out: bf16 [M_sum, N] (written in
    place and returned); m_indices: int32 [M_sum], each row's expert in [0, G) or -1 for padding.
    M_sum and each expert's first row are multiples of :func:`get_m_alignment` (128), and one
    128-row block holds rows of one expert only (its padding rows may sit anywhere in it).
    K is a multiple of 128. Rows whose index is -1 are left untouched in ``out``.

    With ``validate`` (default) the contents of ``m_indices`` are checked, which synchronises with
    the device; pass ``validate=False`` on hot paths (it is skipped inside CUDA-graph capture).
    """
    a_data, sa, b3, sb, k = _operands(a, b, out, 2, 3)
    m, (g, n, _) = a_data.shape[0], b3.shape
    if m % tiles.M_ALIGNMENT != 0:
        raise ValueError(f"a: M_sum = {m} must be a multiple of the alignment {tiles.M_ALIGNMENT}")
    _check_shape("out", out, (m, n))
    if m_indices.dtype != torch.int32 or tuple(m_indices.shape) != (m,) or m_indices.device != a_data.device:
        raise ValueError(f"m_indices: expected int32 [{m}] on {a_data.device}, got {m_indices.dtype} "
                         f"{tuple(m_indices.shape)} on {m_indices.device}")
    if not m_indices.is_contiguous():
        raise ValueError("m_indices: must be contiguous")
    if _checking(validate, m_indices) and m > 0:
        blocks = m_indices.view(-1, tiles.M_ALIGNMENT)
        if bool(((m_indices < -1) | (m_indices >= g)).any()):
            raise ValueError(f"m_indices: values must be -1 (padding) or expert ids in [0, {g})")
        expert = blocks.amax(dim=1, keepdim=True)
        if bool(((blocks != expert) & (blocks != -1)).any()):
            raise ValueError(f"m_indices: each {tiles.M_ALIGNMENT}-row block must hold rows of one expert "
                             "(plus -1 padding): expert blocks must start at aligned rows")
    rows_hint = max(1, m // max(g, 1))
    config = _config(sa is not None, rows_hint, n, m // 128, a_data.device, contiguous=True)
    return launch(CONTIGUOUS, a_data, b3, out, config, sa=sa, sb=sb, m_indices=m_indices)


def m_grouped_gemm_masked(a: Operand, b: Operand, out: torch.Tensor, masked_m: torch.Tensor, expected_m: int,
                          *, validate: bool = True) -> torch.Tensor:
    """Grouped GEMM over fixed-shape slabs: ``out[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T``.

    a: bf16 [G, M_max, K] or (float8_e4m3fn [G, M_max, K], float32 [G, M_max, K/128]); b: bf16
    [G, N, K] or (float8_e4m3fn [G, N, K], float32 [G, ceil(N/128), K/128]); out: bf16 [G, M_max, N];
    masked_m: int32 [G], valid rows of each group, in [0, M_max]; expected_m: the typical valid row
    count, used only to choose tiles. Rows past ``masked_m[g]`` are left untouched. Shapes do not
    depend on ``masked_m``, so the call can be captured in a CUDA graph (content checks are skipped
    during capture; ``validate=False`` skips them elsewhere too).
    """
    a_data, sa, b3, sb, k = _operands(a, b, out, 3, 3)
    (g, m_max, _), n = a_data.shape, b3.shape[1]
    if b3.shape[0] != g:
        raise ValueError(f"b: expected {g} groups (a's first dim), got {b3.shape[0]}")
    _check_shape("out", out, (g, m_max, n))
    if masked_m.dtype != torch.int32 or tuple(masked_m.shape) != (g,) or masked_m.device != a_data.device:
        raise ValueError(f"masked_m: expected int32 [{g}] on {a_data.device}, got {masked_m.dtype} "
                         f"{tuple(masked_m.shape)} on {masked_m.device}")
    if not masked_m.is_contiguous():
        raise ValueError("masked_m: must be contiguous")
    if not isinstance(expected_m, int) or expected_m < 0:
        raise ValueError(f"expected_m: expected a non-negative int, got {expected_m!r}")
    if _checking(validate, masked_m) and g > 0 and bool(((masked_m < 0) | (masked_m > m_max)).any()):
        raise ValueError(f"masked_m: values must lie in [0, M_max = {m_max}], got {masked_m.tolist()}")
    rows_hint = min(max(expected_m, 1), m_max)
    config = _config(sa is not None, rows_hint, n, g * -(-rows_hint // 128), a_data.device)
    return launch(MASKED, a_data, b3, out, config, sa=sa, sb=sb, masked_m=masked_m)


def gemm_fp8_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                out: torch.Tensor) -> torch.Tensor:
    """Dense FP8 GEMM ``out = a @ b.T`` with DeepSeek's scaling.

    a: (float8_e4m3fn [M, K], float32 [M, K/128]); b: (float8_e4m3fn [N, K], float32
    [ceil(N/128), K/128]); out: bf16 [M, N], written in place and returned. K % 128 == 0.
    """
    if not isinstance(a, (tuple, list)) or not isinstance(b, (tuple, list)):
        raise TypeError("gemm_fp8_nt: a and b must be FP8 (data, scales) pairs")
    a_data, sa, b3, sb, k = _operands(a, b, out, 2, 2)
    m, n = a_data.shape[0], b3.shape[1]
    _check_shape("out", out, (m, n))
    config = _config(True, m, n, -(-m // 128), a_data.device)
    return launch(DENSE, a_data, b3, out, config, sa=sa, sb=sb)

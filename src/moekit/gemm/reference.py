"""Plain float64 references for the GEMMs, computed from the dequantised operands, and the error
measures the kernels are accepted by."""

from __future__ import annotations

import torch

from moekit.fp8 import per_block_cast_back, per_token_cast_back


def dequantise(x, weight: bool) -> torch.Tensor:
    """float64 copy of an operand: a bf16 tensor, or an FP8 pair (per-token or per-block scales)."""
    if isinstance(x, (tuple, list)):
        cast_back = per_block_cast_back if weight else per_token_cast_back
        return cast_back(x[0], x[1], dtype=torch.float64)
    return x.double()


def contiguous_reference(a, b, m_indices: torch.Tensor) -> torch.Tensor:
    """float64 [M_sum, N]: row r is ``a[r] @ b[m_indices[r]].T``; padding rows (-1) are NaN."""
    a64, b64 = dequantise(a, False), dequantise(b, True)
    out = torch.full((a64.shape[0], b64.shape[1]), float("nan"), dtype=torch.float64, device=a64.device)
    for g in range(b64.shape[0]):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            out[rows] = a64[rows] @ b64[g].T
    return out


def masked_reference(a, b, masked_m: torch.Tensor) -> torch.Tensor:
    """float64 [G, M_max, N]: ``a[g] @ b[g].T`` on the first masked_m[g] rows, NaN past them."""
    a64, b64 = dequantise(a, False), dequantise(b, True)
    out = torch.einsum("gmk,gnk->gmn", a64, b64)
    rows = torch.arange(a64.shape[1], device=a64.device)
    return out.masked_fill(rows[None, :, None] >= masked_m.to(a64.device)[:, None, None], float("nan"))


def dense_reference(a, b) -> torch.Tensor:
    """float64 [M, N] = a @ b.T."""
    return dequantise(a, False) @ dequantise(b, True).T


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's acceptance measure ``1 - 2 sum(x y) / sum(x^2 + y^2)`` in float64 (0 when equal)."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    return float((out.double() - ref).norm() / ref.norm())


def check(out: torch.Tensor, ref: torch.Tensor, fp8: bool) -> None:
    """Raises AssertionError unless ``out`` matches ``ref`` (NaN in ``ref`` marks elements that must
    keep the NaN poison written before the call): every other element written and finite, within
    DeepGEMM's FP8 measure (calc_diff < 1e-3), a relative error under 1e-2, and element by element
    within bf16 rounding (2^-7 of the value: one bf16 step, twice the rounding error) plus a floor:
    1e-3 of the rms value for bf16 operands; 1e-2 for FP8, whose tensor-core sums within each
    128-deep K block keep fewer bits than fp32 (the reason for promoting them every 128)."""
    expected = ~ref.isnan()
    got = out.double()
    if not bool(got[~expected].isnan().all()):
        raise AssertionError("elements that must be left untouched were written")
    if not bool(got[expected].isfinite().all()):
        raise AssertionError(f"{int((~got[expected].isfinite()).sum())} elements not written or not finite")
    if not bool(expected.any()):
        return
    diff, rel = calc_diff(got[expected], ref[expected]), relative_error(got[expected], ref[expected])
    if (fp8 and diff >= 1e-3) or rel >= 1e-2:
        raise AssertionError(f"too far from the float64 reference: calc_diff {diff:.3g}, relative error {rel:.3g}")
    want = ref[expected]
    floor = (1e-2 if fp8 else 1e-3) * want.pow(2).mean().sqrt()
    excess = (got[expected] - want).abs() - (2.0 ** -7 * want.abs() + floor)
    if bool((excess > 0).any()):
        raise AssertionError(f"{int((excess > 0).sum())} elements beyond bf16 rounding of the reference")

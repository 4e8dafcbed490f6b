"""Random operands for checks and benchmarks: bf16 tensors or FP8 pairs cast with moekit.fp8.

Magnitudes vary by up to 16x between 128-channel groups (activations) and between weight rows, so
that the FP8 scales differ from group to group and a misapplied scale shows in the error.
"""

from __future__ import annotations

import torch

from moekit.fp8 import GROUP, per_block_cast_to_fp8, per_token_cast_to_fp8


def activations(shape: tuple[int, ...], fp8: bool, device: torch.device | str, round_scale: bool = False):
    """Random activations [..., K] (K % 128 == 0): bf16, or (float8_e4m3fn, float32 [..., K/128])."""
    groups = shape[:-1] + (shape[-1] // GROUP, 1)
    x = torch.randn(shape, device=device).unflatten(-1, (-1, GROUP))
    x = (x * torch.rand(groups, device=device).mul(4).exp2()).flatten(-2).to(torch.bfloat16)
    return per_token_cast_to_fp8(x, round_scale) if fp8 else x


def weights(shape: tuple[int, ...], fp8: bool, device: torch.device | str, round_scale: bool = False):
    """Random weights [..., N, K]: bf16, or (float8_e4m3fn contiguous, float32 [..., ceil(N/128), K/128])."""
    w = torch.randn(shape, device=device) * torch.rand(shape[:-1] + (1,), device=device).mul(4).exp2()
    w = w.to(torch.bfloat16)
    if not fp8:
        return w
    data, scales = per_block_cast_to_fp8(w, round_scale)
    return data.contiguous(), scales

"""FP8 (e4m3) casts with DeepSeek's fine-grained scaling, in plain torch (same results on CPU and GPU).

The scale of a group of values (128 channels of one token, or a 128 x 128 block of a weight) is
``scale = max(amax, 1e-4) / 448`` (448 is e4m3's largest finite value) and each value is stored as
``e4m3(x / scale)`` with round-to-nearest, using IEEE float32 division. With ``round_scale`` the
scale is first rounded up to a power of two (``2 ** ceil(log2(scale))``), which makes the division
exact and lets the scale be stored as a bare exponent byte (UE8M0). Dequantisation is
``float(x_fp8) * scale``.

These functions are the reference that the Triton kernels fusing the same cast are checked
against bit for bit.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
GROUP = 128


def _check_groups(x: torch.Tensor, name: str, dim: int = -1) -> None:
    if x.shape[dim] % GROUP != 0:
        raise ValueError(f"{name}: size {x.shape[dim]} of dim {dim} must be a multiple of {GROUP} for FP8 "
                         f"casts (one scale per {GROUP} values); got shape {tuple(x.shape)}")


def scale_from_amax(amax: torch.Tensor, round_scale: bool = False) -> torch.Tensor:
    """float32 scale for each group from its float32 absolute maximum."""
    amax = amax.float().clamp(min=AMAX_FLOOR)
    # A tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal, which can
    # differ from the IEEE quotient in the last bit, and the kernels divide.
    scale = amax / amax.new_full((), FP8_MAX)
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def per_token_cast_to_fp8(x: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Casts ``x`` [..., H] to e4m3 with one float32 scale per token per 128 channels.

    Returns ``(data [..., H] float8_e4m3fn, scales [..., H/128] float32)``.
    """
    _check_groups(x, "x")
    groups = x.float().unflatten(-1, (-1, GROUP))
    scale = scale_from_amax(groups.abs().amax(dim=-1), round_scale)
    data = (groups / scale.unsqueeze(-1)).to(FP8_DTYPE).flatten(-2)
    return data, scale


def per_token_cast_back(data: torch.Tensor, scales: torch.Tensor,
                        dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`per_token_cast_to_fp8`: ``data [..., H]`` times its per-128-channel scales.

    ``scales`` may be float32 ``[..., H/128]`` or UE8M0-packed int32 ``[..., H/512]``.
    """
    _check_groups(data, "data")
    if scales.dtype == torch.int32:
        scales = unpack_ue8m0(scales, data.shape[-1] // GROUP)
    groups = data.float().unflatten(-1, (-1, GROUP)) * scales.float().unsqueeze(-1)
    return groups.flatten(-2).to(dtype)


def per_block_cast_to_fp8(w: torch.Tensor, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Casts a weight ``w`` [..., N, K] to e4m3 with one float32 scale per 128 x 128 block.

    N need not be a multiple of 128 (the last row block is partial); K must be. Returns
    ``(data [..., N, K] float8_e4m3fn, scales [..., ceil(N/128), K/128] float32)``.
    """
    _check_groups(w, "w")
    n, k = w.shape[-2], w.shape[-1]
    pad = (-n) % GROUP
    wf = torch.nn.functional.pad(w.float(), (0, 0, 0, pad))
    blocks = wf.unflatten(-2, (-1, GROUP)).unflatten(-1, (-1, GROUP))  # [..., Nb, 128, Kb, 128]
    scale = scale_from_amax(blocks.abs().amax(dim=(-3, -1)), round_scale)  # [..., Nb, Kb]
    data = (blocks / scale[..., :, None, :, None]).to(FP8_DTYPE)
    return data.flatten(-2).flatten(-3, -2)[..., :n, :k], scale


def per_block_cast_back(data: torch.Tensor, scales: torch.Tensor,
                        dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`per_block_cast_to_fp8`."""
    n = data.shape[-2]
    full = scales.float().repeat_interleave(GROUP, dim=-2)[..., :n, :].repeat_interleave(GROUP, dim=-1)
    return (data.float() * full).to(dtype)


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Packs power-of-two float32 scales [..., G] into int32 [..., ceil(G/4)], four exponent bytes each.

    Byte j (least significant first) of word i holds the biased exponent of scale ``4*i + j``;
    missing groups past G are zero bytes. The scales must be positive powers of two (``round_scale``).
    """
    if scales.dtype != torch.float32:
        raise TypeError(f"scales: expected float32, got {scales.dtype}")
    bits = scales.contiguous().view(torch.int32)
    if bool(((bits & 0x807FFFFF) != 0).any()):
        raise ValueError("scales: UE8M0 packing needs positive powers of two (cast with round_scale=True)")
    exponents = (bits >> 23) & 0xFF
    pad = (-exponents.shape[-1]) % 4
    exponents = torch.nn.functional.pad(exponents, (0, pad)).unflatten(-1, (-1, 4))
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=scales.device)
    return (exponents << shifts).sum(dim=-1, dtype=torch.int32)


def unpack_ue8m0(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: int32 [..., ceil(G/4)] to float32 scales [..., G]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed: expected int32, got {packed.dtype}")
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int32, device=packed.device)
    exponents = (packed.unsqueeze(-1) >> shifts) & 0xFF
    bits = (exponents.flatten(-2)[..., :num_groups] << 23).to(torch.int32)
    return bits.contiguous().view(torch.float32)

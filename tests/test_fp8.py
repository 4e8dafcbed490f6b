"""FP8 casts: hand-computed values, round trips within e4m3's precision, UE8M0 packing."""

import pytest
import torch

from moekit.fp8 import (pack_ue8m0, per_block_cast_back, per_block_cast_to_fp8, per_token_cast_back,
                        per_token_cast_to_fp8, unpack_ue8m0)


def test_per_token_scale_by_hand():
    x = torch.zeros(2, 256)
    x[0, :128] = torch.linspace(-3.5, 2.0, 128)  # amax 3.5
    x[0, 128:] = 896.0  # amax 896 -> scale 2
    # row 1 stays zero: the amax floor 1e-4 keeps the scale finite
    data, scales = per_token_cast_to_fp8(x)
    assert scales[0].tolist() == pytest.approx([3.5 / 448, 2.0])
    assert scales[1].tolist() == pytest.approx([1e-4 / 448] * 2)
    assert float(data[0, 0].float()) == -448.0 and float(data[0, 128].float()) == 448.0
    assert bool((data[1].float() == 0).all())


def test_round_scale_is_the_next_power_of_two():
    x = torch.full((1, 128), 3.5)  # 3.5 / 448 = 0.0078125 = 2**-7 exactly
    x[0, 0] = 5.0  # 5 / 448 lies between 2**-7 and 2**-6
    _, scales = per_token_cast_to_fp8(x, round_scale=True)
    assert scales.item() == 2.0 ** -6


@pytest.mark.parametrize("round_scale", [False, True])
def test_per_token_round_trip_error_bound(round_scale):
    torch.manual_seed(0)
    x = (torch.randn(64, 512) * torch.logspace(-3, 3, 64).unsqueeze(1)).bfloat16()
    data, scales = per_token_cast_to_fp8(x, round_scale)
    back = per_token_cast_back(data, scales, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for normal values, plus the subnormal step.
    bound = x.float().abs() * 2.0 ** -4 + scales.repeat_interleave(128, dim=1) * 2.0 ** -9
    assert bool(((back - x.float()).abs() <= bound).all())


def test_column_major_scales_cast_back_the_same():
    x = torch.randn(8, 256).bfloat16()
    data, scales = per_token_cast_to_fp8(x)
    assert torch.equal(per_token_cast_back(data, scales.t().contiguous().t()), per_token_cast_back(data, scales))


def test_ue8m0_packing_layout_and_round_trip():
    scales = torch.tensor([[2.0 ** -7, 1.0, 2.0 ** 3, 2.0 ** -20, 0.5]])
    packed = pack_ue8m0(scales)
    assert packed.shape == (1, 2) and packed.dtype == torch.int32
    # biased exponents 120, 127, 130, 107 in bytes 0..3 of word 0; 126 in byte 0 of word 1
    assert packed[0, 0].item() == 120 | 127 << 8 | 130 << 16 | (107 << 24) - (1 << 32) * (107 >= 128)
    assert packed[0, 1].item() == 126
    assert torch.equal(unpack_ue8m0(packed, 5), scales)
    x = torch.randn(4, 512)
    data, s = per_token_cast_to_fp8(x, round_scale=True)
    assert torch.equal(per_token_cast_back(data, pack_ue8m0(s)), per_token_cast_back(data, s))


def test_ue8m0_refuses_scales_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="powers of two"):
        pack_ue8m0(torch.tensor([0.3]))
    with pytest.raises(TypeError, match="scales: expected float32"):
        pack_ue8m0(torch.tensor([0.5], dtype=torch.float64))


def test_per_block_cast_partial_row_block():
    torch.manual_seed(1)
    w = torch.randn(300, 256)
    w[:128, :128] *= 100
    data, scales = per_block_cast_to_fp8(w)
    assert data.shape == (300, 256) and scales.shape == (3, 2)
    assert scales[0, 0].item() == pytest.approx(w[:128, :128].abs().max().item() / 448)
    back = per_block_cast_back(data, scales, torch.float32)
    bound = w.abs() * 2.0 ** -4 + scales.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1) * 2.0 ** -9
    assert bool(((back - w).abs() <= bound).all())


def test_hidden_not_multiple_of_128_is_refused():
    with pytest.raises(ValueError, match="x: size 200 of dim -1 must be a multiple of 128"):
        per_token_cast_to_fp8(torch.zeros(2, 200))

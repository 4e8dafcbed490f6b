"""Host-side launch arithmetic of the EP kernels: block sizes and the send / receive split."""

from __future__ import annotations

import pytest
import triton

from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.dispatch import split_programs


def test_next_pow2_matches_triton():
    for n in range(1, 5000):
        assert next_pow2(n) == triton.next_power_of_2(n), n
    assert next_pow2(0) == 1 and next_pow2(1 << 20) == 1 << 20 and next_pow2((1 << 20) + 1) == 1 << 21


@pytest.mark.parametrize("programs", [2, 3, 5, 20, 24, 32, 255])
@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.67, 1.0])
def test_split_keeps_one_program_of_each_kind(programs, share):
    senders, receivers = split_programs(programs, share)
    assert senders >= 1 and receivers >= 1 and senders + receivers == programs
    if 0 < share < 1 and programs >= 8:
        assert abs(senders - programs * share) <= 0.5

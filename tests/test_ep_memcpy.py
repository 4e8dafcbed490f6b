"""Byte copies between addresses (the host path; the CUDA one runs in the GPU combine tests)."""

import torch

from moekit.ep.memcpy import copy_bytes


def test_copies_the_bytes_between_addresses_and_nothing_else():
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    copy_bytes(dst.data_ptr() + 8, src.data_ptr() + 16, 24, None)
    expected = torch.zeros(64, dtype=torch.uint8)
    expected[8:32] = src[16:40]
    assert torch.equal(dst, expected)


def test_no_bytes_copies_nothing():
    dst = torch.zeros(4, dtype=torch.uint8)
    copy_bytes(dst.data_ptr(), 0, 0, None)  # a null source is never read
    assert not dst.any()

"""Pieces of the benchmarks that run without a GPU: row sizes, merging rounds, the NVSHMEM heap size."""

import pytest

from moekit.bench._nvlink import row_bytes
from moekit.bench._vdev import heap_bytes
from moekit.bench.gemm import _median_row


def test_row_bytes_bf16_and_fp8():
    assert row_bytes("bf16", 7168) == 14336
    assert row_bytes("fp8", 7168) == 7168 + 56 * 4  # e4m3 values plus one float32 scale per 128


def test_median_row_takes_each_numbers_median_and_the_first_labels():
    rounds = [{"layout": "masked", "m": 256, "fp8": 500.0, "fp8_cfg": "a", "torch_fp8": None},
              {"layout": "masked", "m": 256, "fp8": 900.0, "fp8_cfg": "b", "torch_fp8": 600.0},
              {"layout": "masked", "m": 256, "fp8": 800.0, "fp8_cfg": "c", "torch_fp8": 700.0}]
    merged = _median_row(rounds)
    assert merged["fp8"] == 800.0 and merged["fp8_cfg"] == "a" and merged["m"] == 256
    assert merged["torch_fp8"] is None  # the first round's missing value stays missing


def test_median_row_of_one_round_is_that_round():
    row = {"layout": "dense", "fp8": 1.5, "bf16": None}
    assert _median_row([row]) == row


@pytest.mark.parametrize("world", [2, 8])
def test_vdev_heap_holds_the_worst_case_rows(world):
    tokens, width = 4096, 14336
    assert heap_bytes(tokens, world, width) >= 2 * tokens * world * width  # input and output buffers

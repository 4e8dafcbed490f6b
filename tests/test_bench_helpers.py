"""Pieces of the benchmarks that run without a GPU: row sizes, merging rounds, the NVSHMEM heap size,
the triton backend's buffer size."""

import pytest

from moekit.bench._nvlink import row_bytes
from moekit.bench._vdev import heap_bytes
from moekit.bench.gemm import _median_row
from moekit.ep.triton_normal import _capacity, one_round_nvl_bytes


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


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 512, 4096])
def test_benchmark_buffer_fits_one_round(world, tokens):
    # The region layouts of triton_normal's dispatch (rows a rank receives) and combine (a token's
    # returning rows from each peer); the whole num_nvl_bytes is the region.
    hidden, topk = 7168, 8
    region = one_round_nvl_bytes(world, tokens, hidden, topk)
    for data, scales in ((2 * hidden, 0), (hidden, 4 * (hidden // 128))):  # bf16, FP8
        received = {"data": data, "scales": scales, "idx": 8 * topk, "weights": 4 * topk, "src": 4}
        assert _capacity(region, received) >= world * tokens
    peers = world - 1
    assert _capacity(region, {"data": 2 * hidden * peers, "weights": 4 * topk * peers}) >= tokens

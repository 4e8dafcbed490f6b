"""Pieces of the benchmarks that run without a GPU: row sizes, merging rounds, the NVSHMEM heap size,
the triton backend's buffer size, the bytes a low-latency call moves across NVLink, timing calls
that take turns."""

import time

import pytest
import torch

from moekit.bench._nvlink import row_bytes
from moekit.bench._vdev import heap_bytes
from moekit.bench.gemm import _median_row
from moekit.bench.low_latency import crossing_bytes
from moekit.bench.timing import median_us, medians_us
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


def test_crossing_bytes_counts_pairs_and_tokens_per_remote_rank():
    hidden = 256
    row = hidden + 2 * 4  # FP8 values and two scales
    # Rank 0: token 0 -> experts on ranks 1, 1, 0; token 1 -> rank 0 only; token 2 -> rank 1 and a -1 slot.
    # Rank 1: token 0 -> ranks 0, 0, 0.
    # Two experts, one per rank: an expert id is its owner's rank.
    owners = [torch.tensor([[1, 1, 0], [0, 0, 0], [1, -1, 0]]), torch.tensor([[0, 0, 0]])]
    per_pair, once, combine, summed = crossing_bytes(owners, 2, hidden)
    # Rank 0 sends 3 remote pairs in 2 tokens and receives 3 pairs in 1 token: the busiest side is 3 pairs.
    assert per_pair == 3 * (row + 16)
    assert once == max(2 * row + 3 * 8, 1 * row + 3 * 8)
    assert combine == 3 * 2 * hidden
    # Summed on the experts' side: rank 0's tokens 0 and 2 each get one float32 row back from rank 1.
    assert summed == 2 * 4 * hidden


def test_crossing_bytes_of_a_rank_that_sends_nothing_remote():
    owners = [torch.zeros(4, 2, dtype=torch.int64), torch.ones(0, 2, dtype=torch.int64)]
    assert crossing_bytes(owners, 2, 128) == (0, 0, 0, 0)


def test_medians_us_takes_turns_and_times_each_call():
    calls = []

    def call(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    fns = {"slow": call("slow", 0.004), "fast": call("fast", 0.0), "mid": call("mid", 0.002)}
    got = medians_us(fns, warmup=1, repeat=3)
    assert list(got) == ["slow", "fast", "mid"]
    assert got["fast"] < got["mid"] < got["slow"] and got["slow"] >= 4000
    # warm-up once each, then every repetition starts one further along the list
    assert calls == ["slow", "fast", "mid"] + ["slow", "fast", "mid", "fast", "mid", "slow", "mid", "slow", "fast"]
    assert median_us(call("one", 0.001), warmup=0, repeat=2) >= 1000

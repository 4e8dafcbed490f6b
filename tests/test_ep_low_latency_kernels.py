"""The triton low-latency kernels' work splits, against the torch backend, and their arrival shares.

The launchers pick how a kernel's work is split over programs (H-chunks per token in the dispatch
send, per (expert, source) in the combine send, channels per program in the combine receive, the
tokens per step of the send's top-k scan) from the sizes; at the small sizes a CPU test affords
they pick few splits. Here each split is forced, including uneven ones, and every call is checked
bit for bit (``compare_with_torch``).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from test_ep_triton_low_latency import Case, compare_with_torch, hook_two_micro_batches

from moekit.ep.kernels.low_latency_dispatch import arrival_share


def with_splits(check, case: Case, send_chunks: int, scan_block: int, tile: int, combine_chunks: int,
                combine_span: int):
    """Runs ``check(case)`` with the launchers' choices replaced by fixed ones."""
    from moekit.ep.kernels import low_latency_combine as comb
    from moekit.ep.kernels import low_latency_dispatch as disp

    saved = disp.send_chunks, disp.SCAN_BLOCK, disp.TILE, comb.TILE, comb.combine_send_chunks, comb.combine_receive_span
    disp.send_chunks = lambda t, h: send_chunks
    disp.SCAN_BLOCK, disp.TILE, comb.TILE = scan_block, tile, tile
    comb.combine_send_chunks = lambda t, w: combine_chunks
    comb.combine_receive_span = lambda n, h: combine_span
    try:
        return check(case)
    finally:
        disp.send_chunks, disp.SCAN_BLOCK, disp.TILE, comb.TILE, comb.combine_send_chunks, comb.combine_receive_span = saved


# (send chunks per token, scan elements, copy tile words, combine send chunks, combine receive channels):
# small scan blocks and tiles make the loops over them take several steps.
SPLITS = [(1, 8192, 4096, 1, 2048), (2, 64, 64, 3, 128), (5, 16, 128, 2, 256)]


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: "-".join(map(str, s)))
def test_fp8_splits(clusters, splits):
    case = Case(tokens=[9, 6], T=10, H=640, E=8, K=3, fp8=True, round_scale=True, seed=11)
    clusters(2).run(with_splits, compare_with_torch, case, *splits)


@pytest.mark.parametrize("splits", SPLITS[1:], ids=lambda s: "-".join(map(str, s)))
def test_bf16_splits_three_ranks(clusters, splits):
    case = Case(tokens=[5, 0, 7], T=7, H=392, E=6, K=4, seed=12)
    clusters(3).run(with_splits, compare_with_torch, case, *splits)


def test_hook_with_splits(clusters):
    case = Case(tokens=[6, 4], T=6, H=384, E=8, K=3, fp8=True, seed=13)
    clusters(2).run(with_splits, hook_two_micro_batches, case, 3, 32, 64, 2, 128)


def test_one_token_many_experts(clusters):
    # Few programs, each signalling many experts that no token chose.
    clusters(2).run(compare_with_torch, Case(tokens=[1, 1], T=1, H=256, E=64, K=8, empty=0.0, seed=14))


@triton.jit
def _shares_kernel(out, count, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    share = arrival_share(index.to(tl.int64), tl.full([BLOCK], count, tl.int64))
    tl.store(out + index, share, mask=index < count)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 56, 4099])
def test_arrival_shares_add_up_to_one_call(count):
    # Whatever the count (a divisor of 1 << 32 or not), the shares of its arrivals sum to exactly
    # one call's worth, so a flag reaches epoch << 32 on the call's last arrival and not before.
    out = torch.full((count,), -1, dtype=torch.int64)
    _shares_kernel[(triton.cdiv(count, 1024),)](out, count, BLOCK=1024)
    assert int(out.sum()) == 1 << 32
    assert int(out[0]) >= (1 << 32) // count
    assert (out[1:] == (1 << 32) // count).all()

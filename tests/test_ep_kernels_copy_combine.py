"""The copy-engine combine's chunking: the host's copy ranges and the kernel's chunk lookup agree."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from moekit.ep.kernels.copy_combine import COPY_CHUNKS, chunk_of, chunk_rows, chunks_per_peer


@triton.jit
def _chunk_of_kernel(out_ptr, rows, BLOCK: tl.constexpr, CHUNKS: tl.constexpr):
    row = tl.arange(0, BLOCK)
    tl.store(out_ptr + row, chunk_of(row, rows, CHUNKS), mask=row < rows)


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 7, 8, 100, 1000])
def test_chunks_cover_the_block_in_order(rows, chunks):
    ranges = [chunk_rows(rows, chunks, c) for c in range(chunks)]
    assert ranges[0][0] == 0 and ranges[-1][1] == rows
    for (lo, hi), (next_lo, _) in zip(ranges, ranges[1:]):
        assert lo <= hi == next_lo
    if chunks >= 3 and rows >= 100:  # the first and last chunks are the small ones
        sizes = [hi - lo for lo, hi in ranges]
        assert max(sizes[0], sizes[-1]) < min(sizes[1:-1])


@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("rows", [1, 2, 5, 64, 1000])
def test_kernel_finds_the_chunk_each_row_is_copied_in(rows, chunks):
    want = torch.empty(rows, dtype=torch.int32)
    for c in range(chunks):
        lo, hi = chunk_rows(rows, chunks, c)
        want[lo:hi] = c
    got = torch.full((rows,), -1, dtype=torch.int32)
    _chunk_of_kernel[(1,)](got, rows, BLOCK=triton.next_power_of_2(rows), CHUNKS=chunks)
    assert torch.equal(got, want)


def test_chunks_are_shared_among_peers():
    assert chunks_per_peer(2) == COPY_CHUNKS
    assert chunks_per_peer(1) == COPY_CHUNKS  # one rank: no peer, nothing copied
    assert all(chunks_per_peer(r) >= 1 for r in range(2, 17))
    assert chunks_per_peer(COPY_CHUNKS + 2) == 1

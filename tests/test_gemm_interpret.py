"""The grouped GEMM kernels under the Triton interpreter on the CPU, against float64 references.

tests/conftest.py sets TRITON_INTERPRET=1 for CPU runs before any kernel module is imported.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import gemm
from moekit.compat import deep_gemm
from moekit.fp8 import pack_ue8m0
from moekit.gemm import config, inputs, kernel, reference
from moekit.gemm.layout import contiguous_m_indices

K, N = 256, 192
NAN = float("nan")


def _contiguous_case(fp8: bool, counts: list[int], n: int = N, k: int = K, round_scale: bool = False):
    # A trailing block of padding only, as a dispatch that over-allocates leaves it.
    idx = torch.cat([contiguous_m_indices(counts), torch.full((128,), -1, dtype=torch.int32)])
    a = inputs.activations((idx.numel(), k), fp8, "cpu", round_scale)
    b = inputs.weights((len(counts), n, k), fp8, "cpu", round_scale)
    out = torch.full((idx.numel(), n), NAN, dtype=torch.bfloat16)
    return a, b, out, idx


@pytest.mark.parametrize("fp8", [False, True])
def test_contiguous(fp8):
    torch.manual_seed(1)
    a, b, out, idx = _contiguous_case(fp8, [100, 0, 200, 128, 1])
    gemm.m_grouped_gemm_contiguous(a, b, out, idx)
    reference.check(out, reference.contiguous_reference(a, b, idx), fp8)


def test_contiguous_padding_anywhere_in_a_block():
    torch.manual_seed(2)
    a, b, out, idx = _contiguous_case(False, [128, 128])
    idx[torch.tensor([0, 5, 64, 127, 130, 200])] = -1
    gemm.m_grouped_gemm_contiguous(a, b, out, idx)
    reference.check(out, reference.contiguous_reference(a, b, idx), False)


@pytest.mark.parametrize("fp8", [False, True])
def test_masked(fp8):
    torch.manual_seed(3)
    g, m_max = 4, 150
    a = inputs.activations((g, m_max, K), fp8, "cpu")
    b = inputs.weights((g, N, K), fp8, "cpu")
    masked_m = torch.tensor([150, 0, 77, 1], dtype=torch.int32)
    out = torch.full((g, m_max, N), NAN, dtype=torch.bfloat16)
    gemm.m_grouped_gemm_masked(a, b, out, masked_m, expected_m=64)
    reference.check(out, reference.masked_reference(a, b, masked_m), fp8)


def test_dense_fp8():
    torch.manual_seed(4)
    a, b = inputs.activations((70, 384), True, "cpu"), inputs.weights((320, 384), True, "cpu")
    out = torch.full((70, 320), NAN, dtype=torch.bfloat16)
    gemm.gemm_fp8_nt(a, b, out)
    reference.check(out, reference.dense_reference(a, b), True)


def test_empty_inputs_leave_out_untouched():
    torch.manual_seed(5)
    a, b, out, idx = _contiguous_case(True, [0, 0])
    gemm.m_grouped_gemm_contiguous(a, b, out, idx)
    assert out.isnan().all()
    a = inputs.activations((2, 64, K), False, "cpu")
    out = torch.full((2, 64, N), NAN, dtype=torch.bfloat16)
    gemm.m_grouped_gemm_masked(a, inputs.weights((2, N, K), False, "cpu"), out, torch.zeros(2, dtype=torch.int32), 0)
    assert out.isnan().all()


@pytest.mark.parametrize("fp8", [False, True])
def test_every_candidate_tile_config(fp8):
    torch.manual_seed(6)
    a, b, out, idx = _contiguous_case(fp8, [70, 200, 0], n=320)
    a_data, sa = a if fp8 else (a, None)
    b_data, sb = b if fp8 else (b, None)
    ref = reference.contiguous_reference(a, b, idx)
    for rows_hint in (32, 4096):
        for cfg in config.candidates(fp8, rows_hint, contiguous=True):
            out.fill_(NAN)
            kernel.launch(kernel.CONTIGUOUS, a_data, b_data, out, cfg, sa=sa, sb=sb, m_indices=idx)
            reference.check(out, ref, fp8)


# The FP8 "pair" K loop: 1, 2 and 3 K blocks (odd counts pad with a zero block past K), one tile
# at most 128 wide (one b scale per tile) and one 256 wide (a b scale per column).
PAIR_CONFIGS = [config.TileConfig(128, 128, 128, num_warps=8, num_stages=3, k_loop="pair"),
                config.TileConfig(64, 256, 128, num_warps=4, num_stages=2, k_loop="pair", ctas_per_sm=2)]


@pytest.mark.parametrize("cfg,k", [(PAIR_CONFIGS[0], 128), (PAIR_CONFIGS[0], 256), (PAIR_CONFIGS[0], 384),
                                   (PAIR_CONFIGS[1], 384)], ids=lambda x: getattr(x, "name", x))
def test_k_loop_pair(cfg, k):
    """Same sums as the serial loop, in the same order: equal to it bit for bit here (the
    interpreter does not fuse multiply-adds), and within the tolerances of the reference."""
    torch.manual_seed(k)
    serial = dataclasses.replace(cfg, k_loop="serial", ctas_per_sm=1)
    n = 320
    a, b, out, idx = _contiguous_case(True, [70, 0, 200], n=n, k=k)
    masked_m = torch.tensor([150, 0, 77], dtype=torch.int32)
    am = inputs.activations((3, 150, k), True, "cpu")
    cases = [(kernel.CONTIGUOUS, a, b, out, {"m_indices": idx}, reference.contiguous_reference(a, b, idx)),
             (kernel.MASKED, am, b, torch.full((3, 150, n), NAN, dtype=torch.bfloat16), {"masked_m": masked_m},
              reference.masked_reference(am, b, masked_m))]
    x, w = inputs.activations((70, k), True, "cpu"), inputs.weights((1, n, k), True, "cpu")
    cases.append((kernel.DENSE, x, w, torch.full((70, n), NAN, dtype=torch.bfloat16), {},
                  reference.dense_reference(x, (w[0][0], w[1][0]))))
    for layout, a_, b_, out_, index, ref in cases:
        got = []
        for c in (cfg, serial):
            out_.fill_(NAN)
            kernel.launch(layout, a_[0], b_[0], out_, c, sa=a_[1], sb=b_[1], **index)
            reference.check(out_, ref, True)
            got.append(out_.clone())
        assert torch.equal(got[0].isnan(), got[1].isnan())
        assert torch.equal(got[0].nan_to_num(), got[1].nan_to_num()), f"layout {layout}: pair != serial"


@pytest.mark.parametrize("layout", [kernel.CONTIGUOUS, kernel.MASKED])
def test_list_row_tiles(layout):
    """The flattened loop's tile lists, over several scan steps (70 tiles of 16 rows): the full tiles
    and the tiles with some valid rows, in order. Contiguous: padding-only tiles at the start, middle
    and end, and expert ids out of range count as padding; masked: counts 0, full, one row, one
    tile exactly, one tile and a row; dense: M ending inside the last tile."""
    torch.manual_seed(8)
    block = 16
    if layout == kernel.CONTIGUOUS:
        groups, rows = 3, 70 * block
        index = torch.randint(-1, groups, (rows,), dtype=torch.int32)
        index[:block] = -1
        index[20 * block:23 * block] = -1
        index[-2 * block:] = -1
        index[40 * block:41 * block] = torch.tensor([-1] * 15 + [groups], dtype=torch.int32)
        tiles_m = rows // block
        index[5 * block:8 * block] = 1  # full tiles (the random rest has padding in every tile)
        ok = ((index >= 0) & (index < groups)).view(tiles_m, block)
        valid, full = ok.any(1), ok.all(1)
    else:
        groups, rows = 14, 80  # 5 tiles per group
        index = torch.randint(0, rows + 1, (groups,), dtype=torch.int32)
        index[:5] = torch.tensor([0, rows, 1, block, block + 1], dtype=torch.int32)
        tiles_m = groups * 5
        starts, counts = torch.arange(5).repeat(groups) * block, index.repeat_interleave(5)
        valid, full = starts < counts, starts + block <= counts
    got = kernel.list_row_tiles(layout, index, rows, groups, tiles_m, block)
    for count, first, tiles in ((got[0], 2, full), (got[1], 2 + tiles_m, valid & ~full)):
        want = tiles.nonzero().flatten().to(torch.int32)
        assert int(count) == want.numel() and torch.equal(got[first:first + want.numel()], want)
    assert int(got[0]) > 0 and int(got[1]) > 0
    dense = kernel.list_row_tiles(kernel.DENSE, index, 3 * block - 5, 1, 3, block)
    assert dense[:4].tolist() == [2, 1, 0, 1] and int(dense[2 + 3]) == 2


@pytest.mark.parametrize("fp8", [False, True])
def test_flattened_tile_loop(fp8):
    """The flattened loop in every layout, including row tiles with no valid row (padding-only
    blocks, an empty expert, masked counts of 0) and with some (stored row by row, after the full
    tiles' TMA stores), and an output whose rows TMA cannot store: bit for bit the nested loop's
    result, and the rows it must not write left untouched."""
    torch.manual_seed(9)
    nested = config.TileConfig(64, 64, 128 if fp8 else 64, num_warps=4, num_stages=2)
    flat = dataclasses.replace(nested, flatten=True)
    a, b, out, idx = _contiguous_case(fp8, [70, 0, 200], n=160)
    am = inputs.activations((3, 150, K), fp8, "cpu")
    x = inputs.activations((70, K), fp8, "cpu")
    split = (lambda t: t) if fp8 else (lambda t: (t, None))
    b_data, sb = split(b)
    cases = [(kernel.CONTIGUOUS, a, b_data, sb, out, {"m_indices": idx}),
             (kernel.MASKED, am, b_data, sb, torch.full((3, 150, 160), NAN, dtype=torch.bfloat16),
              {"masked_m": torch.tensor([150, 0, 77], dtype=torch.int32)}),
             (kernel.DENSE, x, b_data[:1], None if sb is None else sb[:1], torch.full((70, 160), NAN, dtype=torch.bfloat16),
              {})]
    # Rows of 328 bytes: no TMA stores, the flattened loop's full tiles stored row by row.
    unaligned = torch.full((idx.numel(), 164), NAN, dtype=torch.bfloat16)[:, :160]
    cases.append((kernel.CONTIGUOUS, a, b_data, sb, unaligned, {"m_indices": idx}))
    for layout, a_, b_, sb_, out_, index in cases:
        a_data, sa = split(a_)
        got = []
        for cfg in (flat, nested):
            out_.fill_(NAN)
            kernel.launch(layout, a_data, b_, out_, cfg, sa=sa, sb=sb_, **index)
            got.append(out_.clone())
        assert not got[0].isnan().all()
        assert torch.equal(got[0].isnan(), got[1].isnan()), f"layout {layout}: rows written differ"
        assert torch.equal(got[0].nan_to_num(), got[1].nan_to_num()), f"layout {layout}: flattened != nested"


def test_tile_config_names_and_checks():
    for fp8 in (True, False):
        for rows in (32, 4096):
            names = [c.name for c in config.candidates(fp8, rows)]
            assert len(set(names)) == len(names)
    assert config.TileConfig(128, 128, 128, num_stages=3, k_loop="pair", ctas_per_sm=2).name == \
        "128x128x128/w8s3/pair/x2"
    assert config.TileConfig(128, 128, 128).name == "128x128x128/w8s4"
    assert config.TileConfig(128, 256, 64, num_stages=3, flatten=True).name == "128x256x64/w8s3/flat"
    with pytest.raises(ValueError, match="flatten"):
        config.TileConfig(128, 128, 128, k_loop="pair", flatten=True)
    # Flattened tiles only for bf16 in the contiguous layout, with more than 64 rows per expert.
    assert config.select(False, 4096, 4096, 256, 132, contiguous=True).flatten
    assert not any(c.flatten for fp8 in (True, False) for rows in (32, 4096)
                   for c in config.candidates(fp8, rows) + config.candidates(True, rows, contiguous=True))
    assert not any(c.flatten for c in config.candidates(False, 32, contiguous=True))
    with pytest.raises(ValueError, match="k_loop"):
        config.TileConfig(128, 128, 128, k_loop="pipelined")
    with pytest.raises(ValueError, match="ctas_per_sm"):
        config.TileConfig(128, 128, 128, ctas_per_sm=0)
    narrow = config.select(True, 4096, 256, 1, 132)  # few tiles: BLOCK_N halved, the rest kept
    assert narrow.block_n == 64 and narrow.k_loop == config.candidates(True, 4096)[0].k_loop


def test_deep_gemm_names_with_packed_ue8m0_scales():
    torch.manual_seed(7)
    a, b, out, idx = _contiguous_case(True, [50, 130], k=640, round_scale=True)
    ref = reference.contiguous_reference(a, b, idx)
    per_row_b = b[1].repeat_interleave(128, dim=-2)[:, :N]
    deep_gemm.m_grouped_fp8_gemm_nt_contiguous((a[0], pack_ue8m0(a[1])), (b[0], pack_ue8m0(per_row_b)), out, idx)
    reference.check(out, ref, True)
    g, m_max = 2, 40
    a = inputs.activations((g, m_max, K), True, "cpu")
    b = inputs.weights((g, N, K), True, "cpu")
    masked_m = torch.tensor([40, 13], dtype=torch.int32)
    out = torch.full((g, m_max, N), NAN, dtype=torch.bfloat16)
    mn_major = a[1].transpose(-1, -2).contiguous().transpose(-1, -2)
    deep_gemm.m_grouped_fp8_gemm_nt_masked((a[0], mn_major), b, out, masked_m, 32)
    reference.check(out, reference.masked_reference(a, b, masked_m), True)
    a16, b16 = inputs.activations((g, m_max, K), False, "cpu"), inputs.weights((g, N, K), False, "cpu")
    out.fill_(NAN)
    deep_gemm.m_grouped_bf16_gemm_nt_masked(a16, b16, out, masked_m, 32)
    reference.check(out, reference.masked_reference(a16, b16, masked_m), False)
    x, w = inputs.activations((33, K), True, "cpu"), inputs.weights((N, K), True, "cpu")
    d = torch.full((33, N), NAN, dtype=torch.bfloat16)
    deep_gemm.fp8_gemm_nt(x, w, d)
    reference.check(d, reference.dense_reference(x, w), True)

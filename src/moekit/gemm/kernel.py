"""The grouped GEMM kernel (persistent, TMA loads) and its launcher.

One kernel serves the three layouts, chosen by the compile-time ``LAYOUT``:

* ``DENSE``: one group; ``a`` [M, K], ``b`` [1, N, K], ``out`` [M, N].
* ``CONTIGUOUS``: ``a`` [M_sum, K] holds the rows of all experts back to back, each expert's block
  starting at a multiple of 128; ``m_indices`` [M_sum] names each row's expert, -1 for padding.
* ``MASKED``: ``a`` [G, M_max, K]; only the first ``masked_m[g]`` rows of group g are valid.

Each program walks output tiles ``pid, pid + P, pid + 2P, ...`` (P = number of programs, about one
per SM), so one launch covers any number of groups and rows without knowing them on the host.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moekit.gemm.config import K_LOOPS, TileConfig

DENSE, CONTIGUOUS, MASKED = 0, 1, 2
# FP8 K loops by TileConfig.k_loop name: "serial" (in the kernel), "pair" (_fp8_k_loop_pair).
K_LOOP_IDS = {name: i for i, name in enumerate(K_LOOPS)}
# The same values as compile-time constants, the only globals a kernel may read.
_CONTIGUOUS, _MASKED = tl.constexpr(CONTIGUOUS), tl.constexpr(MASKED)
_PAIR = tl.constexpr(K_LOOP_IDS["pair"])
_SCALE_GROUP = tl.constexpr(128)
# Row tiles _row_tiles_kernel scans per step (32 x 128 indices of the contiguous layout).
_ROW_TILES_CHUNK = 32


@triton.jit
def _block_scales(sa_ptrs, sb_ptrs, kb, k_tiles, stride_sak, stride_sbk, row_ok, col_ok, BLOCK_N: tl.constexpr):
    """Scales of K block ``kb`` (0 past the last block): per row of a, and per column of b (one
    scalar when the tile is at most 128 columns wide)."""
    k_ok = kb < k_tiles
    sa = tl.load(sa_ptrs + kb * stride_sak, mask=row_ok & k_ok, other=0.0)
    if BLOCK_N <= _SCALE_GROUP:
        sb = tl.load(sb_ptrs + kb * stride_sbk, mask=k_ok, other=0.0)
    else:
        sb = tl.load(sb_ptrs + kb * stride_sbk, mask=col_ok & k_ok, other=0.0)
    return sa, sb


@triton.jit
def _promote(acc, partial, sa, sb, BLOCK_N: tl.constexpr):
    """``acc + partial * sa[m] * sb[n]``: one K block's fp32 dot added with its two scales."""
    if BLOCK_N <= _SCALE_GROUP:
        res = acc + partial * (sa * sb)[:, None]
    else:
        res = acc + partial * sa[:, None] * sb[None, :]
    return res


# FP8 K loop "pair": two K blocks per iteration, so that the promotion (scale and add) of the even
# block runs while the tensor cores compute the odd one. Triton 3.6 on Hopper makes an MMA (wgmma)
# wait right after it is issued when its result is read in the same iteration (the serial loop's
# case), but leaves it in flight into the next iteration when its result is read there only after
# such a wait; the wait also covers every MMA issued before it. Iteration j:
#
#   even = dot(block 2j)        issued, then waited for; odd_{j-1} has finished too
#   acc += odd_{j-1} * scales   (the only promotion with no MMA in flight)
#   odd  = dot(block 2j + 1)    issued and left in flight
#   acc += even * scales        runs under odd's MMA
#
# Registers hold 3 fp32 tiles (acc, even, odd), 192 per thread at 128 x 128 with 8 warps.
# Two details keep the compiled code as drawn (`python -m moekit.gemm.compiled` shows it for sm_90a
# on any machine; tests/test_gemm_compile.py checks it): the odd_{j-1} promotion sits in
# its own branch (j > 0), which keeps LLVM from moving it below the odd MMA (odd_{j-1} would then
# live beside odd_j, forcing register copies of an in-flight accumulator, and ptxas serialises
# every MMA of the kernel), and the branch's other arm reads `even`, which keeps Triton's loop
# scheduler from hoisting the branch above the even MMA (the odd MMA would then be waited for at
# once). At j = 0 there is no odd_{-1} and acc is still zero: that arm sets acc = even * 0 = 0.
# An odd number of K blocks is padded with one block past K: its TMA loads fill with zeros and
# its scales load as 0, so it adds exactly 0. The blocks are added in the serial loop's order.
@triton.jit
def _fp8_k_loop_pair(a_desc, b_desc, sa_ptrs, sb_ptrs, a_row, b_row, k_tiles, stride_sak, stride_sbk,
                     row_ok, col_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    odd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sa_odd, sb_odd = _block_scales(sa_ptrs, sb_ptrs, k_tiles, k_tiles, stride_sak, stride_sbk, row_ok, col_ok,
                                   BLOCK_N)
    for j in range(tl.cdiv(k_tiles, 2)):
        k0 = 2 * j
        a = a_desc.load([a_row, k0 * BLOCK_K])
        b = b_desc.load([b_row, k0 * BLOCK_K])
        sa_even, sb_even = _block_scales(sa_ptrs, sb_ptrs, k0, k_tiles, stride_sak, stride_sbk, row_ok, col_ok,
                                         BLOCK_N)
        even = tl.dot(a, b.T)
        if j > 0:
            acc = _promote(acc, odd, sa_odd, sb_odd, BLOCK_N)
        else:
            acc = even * 0.0
        a = a_desc.load([a_row, (k0 + 1) * BLOCK_K])
        b = b_desc.load([b_row, (k0 + 1) * BLOCK_K])
        sa_odd, sb_odd = _block_scales(sa_ptrs, sb_ptrs, k0 + 1, k_tiles, stride_sak, stride_sbk, row_ok, col_ok,
                                       BLOCK_N)
        odd = tl.dot(a, b.T)
        acc = _promote(acc, even, sa_even, sb_even, BLOCK_N)
    return _promote(acc, odd, sa_odd, sb_odd, BLOCK_N)


@triton.jit
def _tile_product(a_desc, b_desc, sa_ptr, sb_ptr, ga, gb, m0, n0, a_row, row_ok, N, k_tiles, offs_m, offs_n,
                  stride_sag, stride_sam, stride_sak, stride_sbg, stride_sbn, stride_sbk,
                  FP8: tl.constexpr, UPCAST_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, K_LOOP: tl.constexpr):
    """The fp32 tile ``sum_kb sa * sb * a[rows, kb] @ b[gb][cols, kb].T`` (scales 1 in bf16)."""
    b_row = gb * N + n0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sa_ptrs = sa_ptr + ga * stride_sag + (m0 + offs_m) * stride_sam
    if BLOCK_N <= _SCALE_GROUP:
        sb_ptrs = sb_ptr + gb * stride_sbg + (n0 // _SCALE_GROUP) * stride_sbn
    else:
        sb_ptrs = sb_ptr + gb * stride_sbg + ((n0 + offs_n) // _SCALE_GROUP) * stride_sbn
    if FP8 and K_LOOP == _PAIR:
        acc = _fp8_k_loop_pair(a_desc, b_desc, sa_ptrs, sb_ptrs, a_row, b_row, k_tiles, stride_sak,
                               stride_sbk, row_ok, n0 + offs_n < N, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        for kb in range(k_tiles):
            a = a_desc.load([a_row, kb * BLOCK_K])
            b = b_desc.load([b_row, kb * BLOCK_K])
            if FP8:
                sa = tl.load(sa_ptrs + kb * stride_sak, mask=row_ok, other=0.0)
                if BLOCK_N <= _SCALE_GROUP:
                    sb = tl.load(sb_ptrs + kb * stride_sbk)
                    acc += tl.dot(a, b.T) * (sa * sb)[:, None]
                else:
                    sb = tl.load(sb_ptrs + kb * stride_sbk, mask=n0 + offs_n < N, other=0.0)
                    acc += tl.dot(a, b.T) * sa[:, None] * sb[None, :]
            elif UPCAST_BF16:
                acc = tl.dot(a.to(tl.float32), b.T.to(tl.float32), acc)
            else:
                acc = tl.dot(a, b.T, acc)
    return acc


@triton.jit
def _store_tile(out_ptr, acc, ga, m0, n0, row_ok, N, offs_m, offs_n, stride_og, stride_om, stride_on):
    rows = (m0 + offs_m).to(tl.int64)
    cols = n0 + offs_n
    out_ptrs = out_ptr + ga.to(tl.int64) * stride_og + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


@triton.jit
def _swizzle(tile, num_tiles_m, num_tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of output tile ``tile``: GROUP_M row tiles share each column tile
    while it sits in L2."""
    tiles_in_band = GROUP_M * num_tiles_n
    first_m = (tile // tiles_in_band) * GROUP_M
    band_m = tl.minimum(num_tiles_m - first_m, GROUP_M)
    return first_m + (tile % tiles_in_band) % band_m, (tile % tiles_in_band) // band_m


@triton.jit
def _tile_rows(tile_m, m_indices_ptr, masked_m_ptr, M, G, offs_m, LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tile ``tile_m``: (a's group, b's group, first row in the group, first row of a's 2-D view,
    which rows are valid)."""
    if LAYOUT == _MASKED:
        # A row tile never straddles two groups.
        tiles_per_group = tl.cdiv(M, BLOCK_M)
        ga = tile_m // tiles_per_group
        gb = ga
        m0 = (tile_m % tiles_per_group) * BLOCK_M
        a_row = ga * M + m0
        valid_rows = tl.minimum(tl.load(masked_m_ptr + ga), M)
        row_ok = m0 + offs_m < valid_rows
    elif LAYOUT == _CONTIGUOUS:
        ga = tile_m * 0
        m0 = tile_m * BLOCK_M
        a_row = m0
        experts = tl.load(m_indices_ptr + m0 + offs_m, mask=m0 + offs_m < M, other=-1)
        # All valid rows of a tile share one expert (alignment), so the max names it.
        gb = tl.max(experts, axis=0)
        row_ok = (experts >= 0) & (experts < G)
    else:
        ga = tile_m * 0
        gb = ga
        m0 = tile_m * BLOCK_M
        a_row = m0
        row_ok = m0 + offs_m < M
    return ga, gb, m0, a_row, row_ok


# For each valid output row r of group g and column n:
#   out[r, n] = bf16( sum_kb  sa[r, kb] * sb[g, n // 128, kb] * sum_{k in block kb} a[r, k] * b[g, n, k] )
# FP8: the inner sum is a tensor-core dot accumulated in fp32, promoted into the fp32 total with
# the two scales of its 128-deep K block (DeepSeek's fine-grained scaling). bf16: sa = sb = 1 and
# the dot accumulates directly. Rows that are not valid (padding, past masked_m) are not written.
# UPCAST_BF16 is set only under the CPU interpreter, whose dot has no bf16 path; bf16 products are
# exact in fp32, so the sums are the same.
# FLATTEN (TileConfig.flatten): the tiles are walked from the lists of row_tiles_ptr (see
# _row_tiles_kernel). The row tiles with padding first, nested, stored row by row so that padding
# rows stay untouched. Then the full row tiles, in a loop Triton fuses with its K loop (every tile
# runs all k_tiles steps), so the next tile's loads are issued during this one's store; with
# TMA_STORE the store is a TMA copy of the whole tile, which the warps do not wait for.
@triton.jit
def _grouped_gemm_kernel(
        a_desc, b_desc, out_desc, out_ptr, sa_ptr, sb_ptr, m_indices_ptr, masked_m_ptr, row_tiles_ptr,
        M, N, K, G, num_tiles_m, num_programs,
        stride_og, stride_om, stride_on,
        stride_sag, stride_sam, stride_sak,
        stride_sbg, stride_sbn, stride_sbk,
        LAYOUT: tl.constexpr, FP8: tl.constexpr, UPCAST_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        K_LOOP: tl.constexpr, FLATTEN: tl.constexpr, TMA_STORE: tl.constexpr):
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = K // BLOCK_K
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if FLATTEN:
        listed = 2 + num_tiles_m  # where the list of row tiles with padding starts
        num_full = tl.load(row_tiles_ptr)
        num_tiles_m = tl.load(row_tiles_ptr + 1)
    # Nested: every row tile, or with FLATTEN the listed ones that hold padding.
    for tile in tl.range(pid, num_tiles_m * num_tiles_n, num_programs):
        tile_m, tile_n = _swizzle(tile, num_tiles_m, num_tiles_n, GROUP_M)
        if FLATTEN:
            tile_m = tl.load(row_tiles_ptr + listed + tile_m)
        ga, gb, m0, a_row, row_ok = _tile_rows(tile_m, m_indices_ptr, masked_m_ptr, M, G, offs_m, LAYOUT, BLOCK_M)
        n0 = tile_n * BLOCK_N
        active = (gb >= 0) & (gb < G) & (tl.sum(row_ok.to(tl.int32), axis=0) > 0)
        if active:
            acc = _tile_product(a_desc, b_desc, sa_ptr, sb_ptr, ga, gb, m0, n0, a_row, row_ok, N, k_tiles,
                                offs_m, offs_n, stride_sag, stride_sam, stride_sak, stride_sbg, stride_sbn,
                                stride_sbk, FP8, UPCAST_BF16, BLOCK_M, BLOCK_N, BLOCK_K, K_LOOP)
            _store_tile(out_ptr, acc, ga, m0, n0, row_ok, N, offs_m, offs_n, stride_og, stride_om, stride_on)
    if FLATTEN:
        # The full tiles go on with the same round robin, so that every program gets the same number
        # of tiles (one more or less) and the fused loop runs last.
        nested_tiles = num_tiles_m * num_tiles_n
        first = pid + tl.cdiv(tl.maximum(nested_tiles - pid, 0), num_programs) * num_programs - nested_tiles
        for tile in tl.range(first, num_full * num_tiles_n, num_programs, flatten=True):
            tile_m, tile_n = _swizzle(tile, num_full, num_tiles_n, GROUP_M)
            tile_m = tl.load(row_tiles_ptr + 2 + tile_m)
            ga, gb, m0, a_row, row_ok = _tile_rows(tile_m, m_indices_ptr, masked_m_ptr, M, G, offs_m, LAYOUT,
                                                   BLOCK_M)
            n0 = tile_n * BLOCK_N
            acc = _tile_product(a_desc, b_desc, sa_ptr, sb_ptr, ga, gb, m0, n0, a_row, row_ok, N, k_tiles,
                                offs_m, offs_n, stride_sag, stride_sam, stride_sak, stride_sbg, stride_sbn,
                                stride_sbk, FP8, UPCAST_BF16, BLOCK_M, BLOCK_N, BLOCK_K, K_LOOP)
            if TMA_STORE:
                out_desc.store([ga * M + m0, n0], acc.to(out_ptr.dtype.element_ty))
            else:
                _store_tile(out_ptr, acc, ga, m0, n0, row_ok, N, offs_m, offs_n, stride_og, stride_om, stride_on)


# The row tiles (BLOCK_M rows) that hold a valid row (an expert id in [0, G) in the contiguous
# layout, a row below masked_m[g] in the masked one, any row below M in the dense one), split in
# two lists: row_tiles[0] = how many are full (every row valid), row_tiles[1] = how many are not,
# then the full ones in increasing order from row_tiles[2], the others from row_tiles[2 + num_tiles_m].
# One program scans CHUNK tiles per step.
@triton.jit
def _row_tiles_kernel(m_indices_ptr, masked_m_ptr, row_tiles_ptr, M, G, num_tiles_m,
                      LAYOUT: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    num_full = 0
    num_partial = 0
    for first in range(0, num_tiles_m, CHUNK):
        t = first + tl.arange(0, CHUNK)
        in_range = t < num_tiles_m
        if LAYOUT == _CONTIGUOUS:
            rows = t[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
            experts = tl.load(m_indices_ptr + rows, mask=in_range[:, None] & (rows < M), other=-1)
            valid_in_tile = tl.sum(((experts >= 0) & (experts < G)).to(tl.int32), axis=1)
            valid = valid_in_tile > 0
            full = valid_in_tile == BLOCK_M
        else:
            if LAYOUT == _MASKED:
                tiles_per_group = tl.cdiv(M, BLOCK_M)
                valid_rows = tl.minimum(tl.load(masked_m_ptr + t // tiles_per_group, mask=in_range, other=0), M)
                m0 = (t % tiles_per_group) * BLOCK_M
            else:
                valid_rows = M
                m0 = t * BLOCK_M
            valid = m0 < valid_rows
            full = m0 + BLOCK_M <= valid_rows
        full = full & in_range
        partial = valid & in_range & ~full
        tl.store(row_tiles_ptr + 2 + num_full + tl.cumsum(full.to(tl.int32), axis=0) - 1, t, mask=full)
        tl.store(row_tiles_ptr + 2 + num_tiles_m + num_partial + tl.cumsum(partial.to(tl.int32), axis=0) - 1, t,
                 mask=partial)
        num_full += tl.sum(full.to(tl.int32), axis=0)
        num_partial += tl.sum(partial.to(tl.int32), axis=0)
    tl.store(row_tiles_ptr, num_full)
    tl.store(row_tiles_ptr + 1, num_partial)


def list_row_tiles(layout: int, index: torch.Tensor, m: int, groups: int, tiles_m: int, block_m: int) -> torch.Tensor:
    """int32 [2 + 2 * tiles_m]: of the row tiles of ``block_m`` rows that hold a valid row, how many
    are full and how many are not, then the full ones in order from index 2 and the others from
    index ``2 + tiles_m`` (the rest unwritten). ``index``: ``m_indices`` (contiguous) or
    ``masked_m`` (masked), unread for the dense layout; ``m``: rows (M_sum, M_max or M)."""
    row_tiles = torch.empty(2 + 2 * tiles_m, dtype=torch.int32, device=index.device)
    _row_tiles_kernel[(1,)](index, index, row_tiles, m, groups, tiles_m,
                            LAYOUT=layout, BLOCK_M=block_m, CHUNK=_ROW_TILES_CHUNK, num_warps=4)
    return row_tiles


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1`` set before triton's import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def num_programs(device: torch.device) -> int:
    """Persistent grid size: one program per SM; a few on the CPU so each loops over several tiles."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def launch(layout: int, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, config: TileConfig, *,
           sa: torch.Tensor | None = None, sb: torch.Tensor | None = None,
           m_indices: torch.Tensor | None = None, masked_m: torch.Tensor | None = None) -> torch.Tensor:
    """Runs the kernel on operands already checked by :mod:`moekit.gemm.api`.

    ``a``: contiguous, [M, K] (dense, contiguous) or [G, M_max, K] (masked); ``b``: contiguous
    [G, N, K]; ``out``: bf16 [M, N] or [G, M_max, N], any strides. FP8 when ``sa`` (float32
    [M, K/128] or [G, M_max, K/128]) and ``sb`` (float32 [G, ceil(N/128), K/128]) are given.
    """
    if a.device.type != "cuda" and not interpreting():
        raise RuntimeError("moekit.gemm kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
                           "triton is imported to run them on the CPU")
    fp8 = sa is not None
    groups, n, k = b.shape
    m = a.shape[-2]
    rows_a = a.numel() // k
    out3 = out if out.dim() == 3 else out.unsqueeze(0)
    tiles_m = (a.shape[0] if layout == MASKED else 1) * triton.cdiv(m, config.block_m)
    if rows_a == 0 or tiles_m == 0 or n == 0:
        return out
    a_desc = TensorDescriptor(a.view(rows_a, k), [rows_a, k], [k, 1], [config.block_m, config.block_k])
    b_desc = TensorDescriptor(b.view(groups * n, k), [groups * n, k], [k, 1], [config.block_n, config.block_k])
    if fp8:
        sa3 = sa if sa.dim() == 3 else sa.unsqueeze(0)
        sa_strides = sa3.stride()
        sb_strides = sb.stride()
    else:
        sa = sb = out  # never read: FP8 is off
        sa_strides = sb_strides = (0, 0, 0)
    index = m_indices if m_indices is not None else masked_m
    index = index if index is not None else torch.zeros(1, dtype=torch.int32, device=a.device)
    programs = min(num_programs(a.device) * config.ctas_per_sm, tiles_m * triton.cdiv(n, config.block_n))
    row_tiles = list_row_tiles(layout, index, m, groups, tiles_m, config.block_m) if config.flatten else index
    # TMA stores need a 2-D view of out: unit column stride, 16-byte rows, groups back to back.
    tma_store = (config.flatten and out3.stride(2) == 1 and out3.stride(0) == m * out3.stride(1)
                 and out3.stride(1) * out3.element_size() % 16 == 0 and out3.data_ptr() % 16 == 0)
    out_desc = a_desc  # never read unless tma_store
    if tma_store:
        rows_out = out3.shape[0] * m
        out_desc = TensorDescriptor(torch.as_strided(out3, (rows_out, n), (out3.stride(1), 1)), [rows_out, n],
                                    [out3.stride(1), 1], [config.block_m, config.block_n])
    _grouped_gemm_kernel[(programs,)](
        a_desc, b_desc, out_desc, out3, sa, sb, index, index, row_tiles,
        m, n, k, groups, tiles_m, programs,
        *out3.stride(), *sa_strides, *sb_strides,
        LAYOUT=layout, FP8=fp8, UPCAST_BF16=not fp8 and a.device.type != "cuda",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, K_LOOP=K_LOOP_IDS[config.k_loop] if fp8 else 0, FLATTEN=config.flatten,
        TMA_STORE=tma_store,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out

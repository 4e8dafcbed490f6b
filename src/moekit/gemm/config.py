"""Tile shapes for the grouped GEMM kernel, chosen by a heuristic (no autotuning at run time).

The candidates were timed on an H200 with ``python -m moekit bench gemm --sweep``; the first
candidate of each regime is the one the heuristic returns. FP8 tiles are always 128 deep because
the scales change every 128 channels of K; bf16 tiles are 64 deep, which keeps more pipeline
stages in shared memory at the same tile area.
"""

from __future__ import annotations

from dataclasses import dataclass

# Rows of each expert's block in the contiguous layout start at a multiple of this; every BLOCK_M
# below divides it, so a row tile never holds rows of two experts.
M_ALIGNMENT = 128


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: output tile BLOCK_M x BLOCK_N, K step BLOCK_K, L2 swizzle width
    GROUP_M (row tiles walked together so that they share weight tiles), warps and pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4


# (FP8, at most 64 rows per expert) -> candidates, best first.
_CANDIDATES = {
    (True, True): [TileConfig(64, 128, 128, num_warps=4, num_stages=5),
                   TileConfig(64, 64, 128, num_warps=4, num_stages=6)],
    (True, False): [TileConfig(128, 128, 128, num_warps=8, num_stages=4),
                    TileConfig(128, 256, 128, num_warps=8, num_stages=3),
                    TileConfig(64, 128, 128, num_warps=4, num_stages=5)],
    (False, True): [TileConfig(64, 128, 64, num_warps=4, num_stages=4),
                    TileConfig(64, 64, 64, num_warps=4, num_stages=6)],
    (False, False): [TileConfig(128, 256, 64, num_warps=8, num_stages=3),
                     TileConfig(128, 128, 64, num_warps=8, num_stages=4),
                     TileConfig(128, 128, 64, num_warps=4, num_stages=4)],
}


def candidates(fp8: bool, rows_hint: int) -> list[TileConfig]:
    """Configurations worth trying for operands of this kind, best first by the heuristic.

    ``rows_hint`` is the expected number of rows per expert (the M of a dense GEMM, the mean
    expert block of the contiguous layout, ``expected_m`` of the masked one).
    """
    return list(_CANDIDATES[(fp8, rows_hint <= 64)])


def select(fp8: bool, rows_hint: int, n: int, num_tiles_m: int, num_programs: int) -> TileConfig:
    """The heuristic's configuration; halves BLOCK_N when the output has too few tiles to give every
    SM one (small M), where more tiles matter more than the reuse of wider ones."""
    config = candidates(fp8, rows_hint)[0]
    tiles = num_tiles_m * -(-n // config.block_n)
    if 2 * tiles <= num_programs and config.block_n > 64:
        return TileConfig(config.block_m, config.block_n // 2, config.block_k, config.group_m, config.num_warps,
                          config.num_stages + 1)
    return config

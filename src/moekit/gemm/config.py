"""Tile shapes for the grouped GEMM kernel, chosen by a heuristic (no autotuning at run time).

The candidates were timed on an H200 with ``python -m moekit bench gemm --sweep``; the first
candidate of each regime is the one the heuristic returns. FP8 tiles are always 128 deep because
the scales change every 128 channels of K; bf16 tiles are 64 deep, which keeps more pipeline
stages in shared memory at the same tile area.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Rows of each expert's block in the contiguous layout start at a multiple of this; every BLOCK_M
# below divides it, so a row tile never holds rows of two experts.
M_ALIGNMENT = 128


K_LOOPS = ("serial", "pair")


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: output tile BLOCK_M x BLOCK_N, K step BLOCK_K, L2 swizzle width
    GROUP_M (row tiles walked together so that they share weight tiles), warps and pipeline depth.

    ``k_loop`` (FP8 only; bf16 accumulates inside the MMA) is how each 128-deep K block's partial
    product is promoted into the fp32 total with its scales: ``"serial"`` waits for the block's MMA,
    then scales and adds, with the tensor cores idle meanwhile; ``"pair"`` walks K two blocks per
    iteration and promotes the even block while the tensor cores compute the odd one (one more
    fp32 tile in registers; see kernel._fp8_k_loop_pair). A pair config's ``num_stages`` counts
    iterations of two blocks, so each stage holds twice the shared memory. ``ctas_per_sm``:
    persistent programs launched per SM; 2 lets one program's MMAs run while the other promotes,
    and pays off only when two fit on an SM (registers x threads, shared memory).

    ``flatten``: the persistent tile loop and its K loop become one pipelined loop, so a tile's
    first loads are issued while the tile before it is still being multiplied and stored, instead
    of after, and full tiles are stored with TMA (where ``out``'s strides allow), which the warps
    do not wait for. It needs a K trip count that is the same for every tile, so a small kernel
    first lists the full row tiles and those with padding; the latter follow in a nested loop that
    stores row by row. The stage buffers and the store's staging tile must fit in shared memory
    together. Triton 3.6's pipeliner fails on the "pair" loop flattened."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    k_loop: str = "serial"
    ctas_per_sm: int = 1
    flatten: bool = False

    def __post_init__(self):
        if self.k_loop not in K_LOOPS:
            raise ValueError(f"k_loop: expected one of {K_LOOPS}, got {self.k_loop!r}")
        if self.ctas_per_sm < 1:
            raise ValueError(f"ctas_per_sm: expected a positive int, got {self.ctas_per_sm}")
        if self.flatten and self.k_loop == "pair":
            raise ValueError("flatten: the 'pair' K loop cannot be flattened (Triton's pipeliner fails on it)")

    @property
    def name(self) -> str:
        """Short label, e.g. ``128x128x128/w8s4``, ``128x128x128/w8s2/pair/x2`` or ``128x256x64/w8s3/flat``."""
        label = f"{self.block_m}x{self.block_n}x{self.block_k}/w{self.num_warps}s{self.num_stages}"
        if self.k_loop != "serial":
            label += f"/{self.k_loop}"
        if self.ctas_per_sm != 1:
            label += f"/x{self.ctas_per_sm}"
        if self.flatten:
            label += "/flat"
        return label


# (FP8, at most 64 rows per expert) -> candidates, best first. Timed on an H200 (2026-11-22, FP8,
# median of 30, L2 flushed, three interleaved rounds): the "pair" loop at 3 stages against the
# serial loop gave 966-980 vs 868-872 TFLOP/s on dense 4096 x 4096 x 7168, 932-990 vs 819-917 on
# contiguous 8x4096 N 4096 K 7168, 848 vs 745-748 on masked 4x256 N 4096 K 7168; two 64-row programs
# per SM were best only on masked N 7168 K 2048, by 3-4%. The pair and two-per-SM
# candidates fit sm_90a without spills or serialised MMAs: 128 x 128 pair takes 255 registers per
# thread and 192 KiB (3 stages) or 128 KiB (2 stages) of shared memory; 64 x 128 serial with 4
# warps takes 212 registers and 96 KiB, so two programs fit on one SM; 64 x 128 pair with 4 warps
# takes 255 registers (16 bytes spilled), two fit at 2 stages.
# bf16, more rows: 128 x 256 x 64 at 4 stages against 3 (H200, graph replays, three interleaved
# rounds, TFLOP/s): masked 4x256 N 7168 K 2048 508 vs 456, 2x512 546 vs 522, 2x512 N 4096 K 7168
# 696 vs 653; contiguous shapes within the rounds' spread (622-663 vs 627-682).
_CANDIDATES = {
    (True, True): [TileConfig(64, 128, 128, num_warps=4, num_stages=5),
                   TileConfig(64, 64, 128, num_warps=4, num_stages=6),
                   TileConfig(64, 128, 128, num_warps=4, num_stages=3, k_loop="pair")],
    (True, False): [TileConfig(128, 128, 128, num_warps=8, num_stages=3, k_loop="pair"),
                    TileConfig(128, 128, 128, num_warps=8, num_stages=4),
                    TileConfig(128, 256, 128, num_warps=8, num_stages=3),
                    TileConfig(64, 128, 128, num_warps=4, num_stages=5),
                    TileConfig(128, 128, 128, num_warps=8, num_stages=2, k_loop="pair"),
                    TileConfig(64, 128, 128, num_warps=4, num_stages=4, ctas_per_sm=2),
                    TileConfig(64, 128, 128, num_warps=4, num_stages=2, k_loop="pair", ctas_per_sm=2)],
    (False, True): [TileConfig(64, 128, 64, num_warps=4, num_stages=4),
                    TileConfig(64, 64, 64, num_warps=4, num_stages=6)],
    (False, False): [TileConfig(128, 256, 64, num_warps=8, num_stages=4),
                     TileConfig(128, 256, 64, num_warps=8, num_stages=3),
                     TileConfig(128, 128, 64, num_warps=8, num_stages=4),
                     TileConfig(128, 128, 64, num_warps=4, num_stages=4)],
}


# bf16 in the contiguous layout with more rows: the flattened loop first. H200, graph replays, L2
# flushed, the calls taking turns (40 repetitions), TFLOP/s of 128 x 256 x 64 at 3 stages flattened
# with TMA stores, against unflattened at 4 stages (two A/B runs chained, see BENCHMARKS.md):
# 8x4096 N 4096 K 7168 +1.6%, 4x8192 +1.4%, 8x4096 N 7168 K 2048 +7.9%, 4x8192 +6.4%, behind 8192
# padding rows +7.1%. Flattened at 4 stages the stage buffers and the store's staging tile do not
# fit in shared memory together and it ran at half speed (300); at 2 stages 460. In the masked
# layout (at most a few row tiles per group) the flattened 3 stages lost 2-6% at K 7168 to the
# unflattened 4.
_FLAT_CONTIGUOUS_BF16 = TileConfig(128, 256, 64, num_warps=8, num_stages=3, flatten=True)


def candidates(fp8: bool, rows_hint: int, contiguous: bool = False) -> list[TileConfig]:
    """Configurations worth trying for operands of this kind, best first by the heuristic.

    ``rows_hint`` is the expected number of rows per expert (the M of a dense GEMM, the mean
    expert block of the contiguous layout, ``expected_m`` of the masked one); ``contiguous``: the
    operands are in the contiguous layout.
    """
    found = list(_CANDIDATES[(fp8, rows_hint <= 64)])
    if contiguous and not fp8 and rows_hint > 64:
        found.insert(0, _FLAT_CONTIGUOUS_BF16)
    return found


def select(fp8: bool, rows_hint: int, n: int, num_tiles_m: int, num_programs: int,
           contiguous: bool = False) -> TileConfig:
    """The heuristic's configuration; halves BLOCK_N when the output has too few tiles to give every
    SM one (small M), where more tiles matter more than the reuse of wider ones. A halved serial
    tile gets one more pipeline stage in the shared memory it frees; a pair tile keeps its stages
    (each holds two K blocks)."""
    config = candidates(fp8, rows_hint, contiguous)[0]
    tiles = num_tiles_m * -(-n // config.block_n)
    if 2 * tiles <= num_programs and config.block_n > 64:
        stages = config.num_stages + (config.k_loop == "serial")
        return replace(config, block_n=config.block_n // 2, num_stages=stages)
    return config

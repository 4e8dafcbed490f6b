"""``python -m moekit bench nvlink``: how fast kernel stores move rows into a peer GPU over NVLink.

The high-throughput dispatch's senders load rows from their own GPU's memory and store them into a
peer's symmetric heap, publishing their progress with a release-ordered flag every few rows. This
benchmark times that pattern alone, so that the dispatch can be compared with what its stores can
do at all: every rank pushes ``--rows`` rows of ``--row-bytes`` into the next rank's heap at once,
with P programs (thread blocks), the rows landing in order or at a random permutation of the
destination rows, and a progress flag every F tiles of rows (F = 0: none). The copy engine's peer
bandwidth, measured in the same run, is the baseline.

With ``--under-copy-engines`` it times instead what a design that mixes copy-engine transfers with
kernel work meets: P programs (of 16 warps, as the EP kernels') copying the same rows within their
own GPU, alone and while copy engines move data over NVLink: out of this GPU (rank 0 pushing to
rank 1), into it (rank 1 seen while rank 0 pushes), and both ways (every rank pushing to the next).
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from moekit.bench._nvlink import peer_copy_bandwidth_gbps, run_sizes
from moekit.bench.report import Report, add_output_args
from moekit.bench.timing import median_us
from moekit.ep.kernels.blocks import next_pow2
from moekit.ep.kernels.sync import signal

# int32 words one program moves per step: 64 KiB, as the dispatch's senders do.
TILE_WORDS = 16384


# Program q of P copies rows [q * ceil(n / P), ...) of src [n, words] (int32) into the peer's rows
# dst[order[i]] (order[i] = i without SCATTER), BLOCK_T rows x BLOCK_W words at a time, and after every FLAG_EVERY
# row tiles sets the peer's flag word q to the number of tiles done, ordered after its stores.
@triton.jit
def push_rows_kernel(src_ptr, dst_addr, order_ptr, flags_addr, n_rows, words, SCATTER: tl.constexpr,
                     FLAG_EVERY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    q = tl.program_id(0)
    per = tl.cdiv(n_rows, tl.num_programs(0))
    begin = q * per
    end = tl.minimum(begin + per, n_rows)
    dst = dst_addr.to(tl.pointer_type(tl.int32))
    t_offs = tl.arange(0, BLOCK_T)
    w_offs = tl.arange(0, BLOCK_W)
    tiles = 0
    for t0 in range(begin, end, BLOCK_T):
        t = t0 + t_offs
        live = t < end
        if SCATTER:
            rows = tl.load(order_ptr + t, mask=live, other=0).to(tl.int64)
        else:
            rows = t.to(tl.int64)
        for w0 in range(0, words, BLOCK_W):
            w = w0 + w_offs
            mask = live[:, None] & (w < words)[None, :]
            tile = tl.load(src_ptr + t.to(tl.int64)[:, None] * words + w[None, :], mask=mask)
            tl.store(dst + rows[:, None] * words + w[None, :], tile, mask=mask)
        tiles += 1
        if FLAG_EVERY > 0:
            if tiles % FLAG_EVERY == 0:
                signal((flags_addr + q * 8).to(tl.pointer_type(tl.int64)), tiles.to(tl.int64))


def push_rows(src: torch.Tensor, dst_addr: int, order: torch.Tensor, flags_addr: int, programs: int,
              flag_every: int, scatter: bool, tile_words: int = TILE_WORDS, num_warps: int = 4) -> None:
    """Launches :func:`push_rows_kernel`: ``src`` int32 [n, words] (contiguous) into the rows at
    address ``dst_addr`` (another rank's heap), ``order`` int32 [n] the destination rows when
    ``scatter``; ``flags_addr`` int64 [programs] flag words in that heap; about ``tile_words``
    words per step (a power of two)."""
    n, words = src.shape
    block_w = min(next_pow2(words), tile_words)
    push_rows_kernel[(programs,)](src, dst_addr, order, flags_addr, n, words, SCATTER=scatter, FLAG_EVERY=flag_every,
                                  BLOCK_T=max(1, tile_words // block_w), BLOCK_W=block_w, num_warps=num_warps)


def measure(rows: int, row_bytes: int, programs: list[int], flag_every: list[int], repeat: int) -> list[dict]:
    """On each rank: GB/s of every (programs, pattern, flag interval) pushing into the next rank."""
    from moekit.ep.heap import SymmetricHeap

    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    words = row_bytes // 4
    data_bytes = rows * words * 4
    heap = SymmetricHeap(dist.group.WORLD, data_bytes + 8 * max(programs), dev)
    peer = (rank + 1) % world
    base = int(heap.ptrs[peer].item())
    src = torch.randint(0, 1 << 30, (rows, words), dtype=torch.int32, device=dev)
    order = torch.randperm(rows, device=dev).to(torch.int32)
    ceiling = peer_copy_bandwidth_gbps(256 << 20)  # large enough that the copy's start does not count
    results = []
    for p, scatter, every in itertools.product(programs, (False, True), flag_every):
        us = median_us(lambda: push_rows(src, base, order, base + data_bytes, p, every, scatter), warmup=3,
                       repeat=repeat, setup=dist.barrier)
        gbps = data_bytes / us / 1e3
        pattern = "scattered" if scatter else "in order"
        results.append(dict(programs=p, pattern=pattern, flag_every=every, us=us, gbps=gbps,
                            of_copy_engine=gbps / ceiling, copy_engine_gbps=ceiling,
                            case=f"{pattern}, flag every {every}" if every else f"{pattern}, no flag"))
    return results


# Bytes the copy engines move while a local copy is timed: enough to outlast it.
_TRAFFIC_BYTES = 256 << 20
# GPU clock cycles (about 10 us) between starting the pushes and the timed copy, and untimed rounds.
_HEAD_START_CYCLES = 20000
_WARMUP = 3
TRAFFIC = {"none": "none", "out": "out of this GPU (its copy engine pushes to the next)",
           "in": "into this GPU (the previous GPU's copy engine pushes)", "both": "both ways (every GPU pushes)"}


def traffic_rows(per_rank: list[list[dict]]) -> list[dict]:
    """Rows of the local-copy table from every rank's timings (``per_rank[r]``: one dict per
    (programs, pushers) case): rank 0's for no traffic, outgoing and both ways, rank 1's (whose
    previous rank alone pushed) for incoming; each with its rate as a fraction of the same rank's rate
    with no traffic."""
    picks = [("none", 0, "none"), ("out", 0, "rank 0"), ("in", 1, "rank 0"), ("both", 0, "every rank")]
    rows = []
    for traffic, rank, pushers in picks:
        alone = {row["programs"]: row["gbps"] for row in per_rank[rank] if row["pushers"] == "none"}
        for row in per_rank[rank]:
            if row["pushers"] == pushers:
                rows.append(dict(programs=row["programs"], traffic=TRAFFIC[traffic], us=row["us"], gbps=row["gbps"],
                                 of_alone=row["gbps"] / alone[row["programs"]]))
    return sorted(rows, key=lambda r: r["programs"])


def measure_under_copy_engines(rows: int, row_bytes: int, programs: list[int], repeat: int) -> list[dict]:
    """On each rank: GB/s of ``programs`` thread blocks (16 warps each, as the EP kernels') copying
    ``rows`` rows within this GPU, with no copy-engine traffic, while rank 0's copy engine pushes to
    rank 1, and while every rank's copy engine pushes to the next; returns :func:`traffic_rows` of
    every rank's medians. The cases take turns within each repetition, so clock changes over the run reach all."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    src = torch.randint(0, 1 << 30, (rows, row_bytes // 4), dtype=torch.int32, device=dev)
    dst = torch.empty_like(src)
    order = torch.arange(rows, dtype=torch.int32, device=dev)
    traffic_bytes = max(_TRAFFIC_BYTES, 8 * src.numel() * 4)
    outgoing = torch.empty(traffic_bytes, dtype=torch.uint8, device=dev)
    landing = torch.empty(traffic_bytes, dtype=torch.uint8, device=(dev.index + 1) % torch.cuda.device_count())
    side = torch.cuda.Stream(dev)
    cases = list(itertools.product(("none", "rank 0", "every rank"), programs))
    times: dict[tuple, list[float]] = {case: [] for case in cases}
    for rep in range(_WARMUP + repeat):
        for pushers, p in cases:
            torch.cuda.synchronize()
            dist.barrier()
            if pushers == "every rank" or (pushers == "rank 0" and rank == 0):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    landing.copy_(outgoing, non_blocking=True)
            torch.cuda._sleep(_HEAD_START_CYCLES)  # every rank waits alike, so the pushes are under way
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            push_rows(src, dst.data_ptr(), order, 0, p, 0, False, num_warps=16)
            end.record()
            end.synchronize()
            if rep >= _WARMUP:
                times[pushers, p].append(start.elapsed_time(end) * 1e3)
    torch.cuda.synchronize()
    medians = {case: statistics.median(times[case]) for case in cases}
    timings = [dict(programs=p, pushers=pushers, us=medians[pushers, p],
                    gbps=src.numel() * 4 / medians[pushers, p] / 1e3) for pushers, p in cases]
    per_rank = [None] * world
    dist.all_gather_object(per_rank, timings)
    return traffic_rows(per_rank)


COLUMNS = {"programs": "programs", "pattern": "rows land", "flag_every": "flag every (tiles)", "us": "us",
           "gbps": "GB/s", "of_copy_engine": "of copy engine"}
LOCAL_COLUMNS = {"programs": "programs", "traffic": "copy-engine traffic over NVLink", "us": "us",
                 "gbps": "GB/s copied", "of_alone": "of the rate alone"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit bench nvlink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="rows each rank pushes (default: 4096 tokens)")
    parser.add_argument("--row-bytes", type=int, default=14336, help="bytes per row, a multiple of 16 "
                        "(default: a bf16 row of hidden 7168)")
    parser.add_argument("--programs", type=int, nargs="+", default=[16, 24, 32, 132],
                        help="thread blocks that push (the EP kernels' default SM budget is 24)")
    parser.add_argument("--flag-every", type=int, nargs="+", default=[0, 1, 4],
                        help="row tiles (64 KiB) between two progress flags; 0: no flag")
    parser.add_argument("--repeat", type=int, default=50, help="timed pushes per case (median reported)")
    parser.add_argument("--ranks", type=int, default=None, help="GPUs (ranks) to use; default: every GPU")
    parser.add_argument("--under-copy-engines", action="store_true",
                        help="time copies within each GPU, alone and under copy-engine traffic, instead of pushes")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.row_bytes <= 0 or args.row_bytes % 16:
        parser.error(f"--rows must be positive and --row-bytes a positive multiple of 16, got {args.rows} and "
                     f"{args.row_bytes}")
    if min(args.programs) <= 0 or min(args.flag_every) < 0 or args.repeat <= 0:
        parser.error("--programs and --repeat must be positive and --flag-every non-negative")
    world = args.ranks or torch.cuda.device_count()
    if args.under_copy_engines:
        rows = run_sizes("nvlink", [args.rows], measure_under_copy_engines, args.row_bytes, args.programs,
                         args.repeat, ranks=args.ranks)
        report = Report(f"kernel copies within a GPU under copy-engine traffic, {world} GPUs", LOCAL_COLUMNS,
                        settings={"rows": args.rows, "row_bytes": args.row_bytes})
        for row in rows:
            report.add(**row)
        report.finish(args, x="programs", series=["gbps"], group="traffic", ylabel="GB/s copied")
        return 0
    rows = run_sizes("nvlink", [args.rows], measure, args.row_bytes, args.programs, args.flag_every, args.repeat,
                     ranks=args.ranks)
    report = Report(f"kernel stores into the next GPU, {world} GPUs all pushing (rank 0)", COLUMNS,
                    settings={"rows": args.rows, "row_bytes": args.row_bytes})
    for row in rows:
        report.add(**row)
    report.notes.append(f"copy engine, every GPU pushing to the next: {rows[0]['copy_engine_gbps']:.0f} GB/s")
    report.finish(args, x="programs", series=["gbps"], group="case", ylabel="GB/s")
    return 0

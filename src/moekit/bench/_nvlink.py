"""Pieces the expert-parallel benchmarks share: what NVLink and NCCL do on the same machine, in the
same run, and the routing the benchmarks time.

Every function here runs on every rank of the current default group (one process per GPU).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from moekit.bench.report import Report, add_output_args
from moekit.bench.timing import back_to_back_us, median_us


def add_size_args(parser) -> None:
    """The sizes the dispatch / combine benchmarks sweep (DeepEP's test sizes by default)."""
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--sms", type=int, default=24, help="SMs the moekit kernels may use")
    parser.add_argument("--ranks", type=int, default=None, help="GPUs (ranks) to use; default: every GPU")
    parser.add_argument("--no-vdev", action="store_true", help="skip torch's all_to_all_vdev_2d baseline")


def row_bytes(fmt: str, hidden: int) -> int:
    """Bytes of one dispatched row: bf16 values, or e4m3 values plus one float32 scale per 128."""
    return 2 * hidden if fmt == "bf16" else hidden + 4 * (hidden // 128)


def ep_setup(num_tokens: int, hidden: int, topk: int, num_experts: int, num_sms: int):
    """What the dispatch and combine benchmarks start from on this rank: its random routing, a
    triton-backend Buffer holding one round (``num_sms`` SMs), a torch-backend one, and the dispatch
    arguments from the layout. Returns (x, fast, ref, dispatch kwargs)."""
    from moekit.ep import Buffer
    from moekit.ep.triton_normal import one_round_nvl_bytes

    Buffer.set_num_sms(num_sms)
    x, idx, weights = random_routing(num_tokens, hidden, topk, num_experts, seed=dist.get_rank())
    fast = Buffer(num_nvl_bytes=one_round_nvl_bytes(dist.get_world_size(), num_tokens, hidden, topk), backend="triton")
    ref = Buffer(backend="torch")
    layout = fast.get_dispatch_layout(idx, num_experts)
    args = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                topk_idx=idx, topk_weights=weights)
    return x, fast, ref, args


def peer_copy_bandwidth_gbps(nbytes: int) -> float:
    """GB/s (1e9 bytes/s) one GPU pushes into the next rank's GPU with the copy engine while every
    GPU pushes at once: the practical NVLink ceiling a kernel can be measured against."""
    world = dist.get_world_size()
    here = torch.cuda.current_device()
    peer = (here + 1) % torch.cuda.device_count()
    src = torch.empty(nbytes, dtype=torch.uint8, device=here).random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=peer)

    def push():
        dst.copy_(src, non_blocking=True)

    dist.barrier()
    us = median_us(push, warmup=3, repeat=10, setup=lambda: dist.barrier() if world > 1 else None)
    return nbytes / us / 1e3


def nccl_all_to_all_us(send_rows: list[int], recv_rows: list[int], row_bytes: int) -> float:
    """Microseconds per call (back to back, see ``back_to_back_us``) of NCCL ``all_to_all_single``
    moving rows of ``row_bytes`` already grouped by destination (``send_rows[r]`` to rank r,
    ``recv_rows[r]`` from it): the baseline a dispatch or combine is compared with; no permutation is
    counted against it."""
    device = torch.device("cuda", torch.cuda.current_device())
    send = torch.empty(sum(send_rows), row_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    recv = torch.empty(sum(recv_rows), row_bytes, dtype=torch.uint8, device=device)

    def exchange():
        dist.all_to_all_single(recv, send, recv_rows, send_rows)

    return back_to_back_us(exchange, before=dist.barrier)


def random_routing(num_tokens: int, hidden: int, topk: int, num_experts: int, seed: int):
    """bf16 [N, H] activations, int64 [N, K] distinct random experts, float32 [N, K] weights (on the GPU)."""
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device=device, generator=gen).to(torch.bfloat16)
    scores = torch.rand(num_tokens, num_experts, device=device, generator=gen)
    idx = scores.topk(topk, dim=1).indices
    weights = torch.rand(num_tokens, topk, device=device, generator=gen)
    return x, idx, weights


def run_sizes(title: str, sizes: list[int], fn, *args, ranks: int | None = None,
              env: dict[str, str] | None = None) -> list[dict]:
    """Runs ``fn(num_tokens, *args)`` on ``ranks`` GPU ranks (default: every GPU; environment ``env``)
    for each size, with a progress bar; returns rank 0's rows."""
    from rich.progress import Progress

    from moekit.testing.cluster import Cluster

    gpus = torch.cuda.device_count()
    ranks = gpus if ranks is None else ranks
    if not 2 <= ranks <= gpus:
        raise SystemExit(f"{title}: needs 2 or more GPUs joined by NVLink (asked for {ranks}, found {gpus})")
    rows = []
    with Cluster(ranks, backend="nccl", timeout_s=600, env=env) as cluster, Progress() as progress:
        task = progress.add_task(title, total=len(sizes))
        for n in sizes:
            rows.extend(cluster.run(fn, n, *args)[0])
            progress.advance(task)
    return rows


def _add_vdev(report: Report, args, formats: tuple[str, ...]) -> None:
    """Adds torch's ``all_to_all_vdev_2d`` time on the same routing to each row (worker processes of
    its own: its NVSHMEM backend is chosen once per process)."""
    from moekit.bench import _vdev

    widths = [row_bytes(f, args.hidden) for f in formats]
    world = args.ranks or torch.cuda.device_count()
    heap = _vdev.heap_bytes(max(args.tokens), world, max(widths))
    found = {(r["tokens"], r["row_bytes"]): r
             for r in run_sizes("all_to_all_vdev_2d", args.tokens, _vdev.measure, args.hidden, args.topk,
                                args.experts, widths, ranks=args.ranks,
                                env={"NVSHMEM_SYMMETRIC_SIZE": str(heap)})}
    for row in report.rows:
        got = found.get((row["tokens"], row_bytes(row["format"], args.hidden)), {})
        row["vdev_us"] = got.get("vdev_us")
        row["vs_vdev"] = row["vdev_us"] / row["us_cached"] if row["vdev_us"] else None
    errors = {r["vdev_error"] for r in found.values() if r.get("vdev_error")}
    if errors:
        report.notes.append("all_to_all_vdev_2d did not run: " + "; ".join(sorted(errors)))


def sweep_main(argv: list[str], name: str, description: str, title: str, columns: dict[str, str], measure,
               series: list[str], group: str | None = None, formats: tuple[str, ...] = ("bf16",)) -> int:
    """The command line of a token-count sweep: parse the sizes, run ``measure`` on every rank for each
    size (rows of each of ``formats``), then torch's ``all_to_all_vdev_2d`` on the same routing,
    print the table (with the peer bandwidth measured in the run) and save what was asked."""
    parser = argparse.ArgumentParser(prog=f"python -m moekit bench {name}", description=description)
    add_size_args(parser)
    add_output_args(parser)
    args = parser.parse_args(argv)
    report = Report(f"{title}, {args.ranks or torch.cuda.device_count()} GPUs (rank 0)", columns,
                    settings={"hidden": args.hidden, "topk": args.topk, "experts": args.experts, "sms": args.sms})
    for row in run_sizes(name, args.tokens, measure, args.hidden, args.topk, args.experts, args.sms,
                         ranks=args.ranks):
        report.add(**row)
    if not args.no_vdev:
        _add_vdev(report, args, formats)
    report.notes.append("peer copy-engine bandwidth, every GPU pushing to the next: "
                        f"{report.rows[0]['peer_gbps']:.0f} GB/s")
    report.notes.append("vdev_2d: torch's all_to_all_vdev_2d (NVSHMEM) moving the same rows as NCCL, one split "
                        "per rank")
    report.finish(args, x="tokens", series=series, group=group, ylabel="us")
    return 0

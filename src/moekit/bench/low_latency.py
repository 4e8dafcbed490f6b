"""Low-latency dispatch / combine (decoding) on the GPUs of one host: the triton backend against the
torch backend (NCCL, eager: its per-call rank check synchronises with the host) on the same inputs.

Per tokens-per-rank T: median latency of dispatch (FP8, per-128-channel scales) and combine (bf16,
weighted) over graph replays; with the receive hook, the send and the receive parts apart (the
receive timed after every rank's sends finished, so it holds no waiting). Each call is timed four
ways. Queued (the main figure, the device's own latency): the GPU is held while the host queues a
device-side barrier and the replay, so the time runs from the moment every GPU is ready; it
includes the start of the graph and the timing events. In graph: what each call adds to a graph
that runs it back to back (graphs of 2 and 10 calls, the difference over 8): the call's kernels
and the gaps between them, as when the call is one step of a decoding step's graph. From idle:
the replay is launched on an idle GPU, so the time includes the host's launch of the graph.
Kernels: the durations of the call's kernels as the GPU's profiler records them, summed (how
DeepEP's tests time theirs), which leaves out the gaps.

The floor is the bytes that cross NVLink at the busiest rank (the larger of what it sends and what
it receives) over the measured peer bandwidth, plus one measured flag round trip. Two floors are
printed for dispatch: "d floor" counts a message per (token, expert) pair whose expert is on another
GPU (FP8 ``H + H/128*4 + 16`` bytes each, as DeepEP's protocol moves them), "d floor, once per rank"
counts what moekit moves: each token's row and scales once per other GPU that holds one of its
experts, plus an 8-byte header per remote pair. Combine moves bf16 ``2H`` per remote pair back
("c floor"); a combine that sums on the experts' side (column "c summed", see
``TritonLowLatency.presums``; the hook's halves never do) moves one float32 ``4H`` row per
(token, other GPU holding one of its experts) instead ("c floor, summed").
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections import defaultdict
from typing import Callable

import torch
import torch.distributed as dist

from moekit.bench.report import Report, add_output_args
from moekit.ep.layout import token_ranks


def _inputs(t: int, hidden: int, experts: int, topk: int, seed: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, hidden, generator=gen, device=device).bfloat16()
    idx = torch.rand(t, experts, generator=gen, device=device).topk(topk, dim=1).indices
    weights = torch.rand(t, topk, generator=gen, device=device)
    return x, idx, weights


# Cycles the GPU sleeps before a queued step (about 0.5 ms): longer than the host takes to queue
# the barrier and the step behind it.
_HOLD_CYCLES = 1_000_000


def _medians(steps: list[Callable[[], object]], repeat: int, settle_before: set[int],
             line_up: Callable[[], object] | None = None) -> list[float]:
    """Runs ``steps`` in order ``repeat`` times (after 3 warm-up rounds); returns each one's median
    microseconds (device events). Before the steps whose index is in ``settle_before`` all ranks
    synchronise, so those are timed without waiting for a peer. ``line_up``, if given, is queued
    before every step's start event (see :func:`_queued`)."""
    times: list[list[float]] = [[] for _ in steps]
    for step in range(repeat + 3):
        for i, run in enumerate(steps):
            if i in settle_before:
                torch.cuda.synchronize()
                dist.barrier()
            if line_up is not None:
                line_up()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            if step >= 3:
                times[i].append(start.elapsed_time(end) * 1e3)
    return [statistics.median(t) for t in times]


def _queued(barrier: Callable[[], None]) -> Callable[[], None]:
    """A ``line_up`` for :func:`_medians`: the GPU sleeps while the host queues ``barrier`` (a
    device-side barrier of the ranks) and the timed step, so the step's time is the device's
    alone, from the moment every GPU reached the barrier, not from the host's launch."""
    def line_up() -> None:
        torch.cuda._sleep(_HOLD_CYCLES)
        barrier()
    return line_up


def _kernels_us(step: Callable[[], object], line_up: Callable[[], None], repeat: int) -> float:
    """Median over ``repeat`` queued runs of ``step`` of each of its kernels' durations (the GPU
    profiler's records of the kernels named ``low_latency_*``), summed."""
    durations: dict[str, list[float]] = defaultdict(list)
    with warnings.catch_warnings():  # each profile is one cycle: its note on cycles does not apply
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(repeat):
                line_up()
                step()
            torch.cuda.synchronize()
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.name.startswith("low_latency_"):
            durations[event.name].append(event.time_range.elapsed_us())
    return sum(statistics.median(d) for d in durations.values()) if durations else float("nan")


def _tiny_graph_us(line_up: Callable[[], None], repeat: int) -> tuple[float, float, float]:
    """(from idle, queued, in graph) median microseconds of a graph that holds one small kernel:
    what launch from an idle GPU, and the start of a graph, add to a replay's time."""
    scratch = torch.zeros(1024, device=torch.device("cuda", torch.cuda.current_device()))
    scratch.add_(1)
    graph = _capture([lambda: scratch.add_(1)])[0]
    return (_medians([graph.replay], repeat, set())[0], _medians([graph.replay], repeat, set(), line_up)[0],
            _in_graph_us(lambda: scratch.add_(1), repeat, line_up))


def _in_graph_us(fn: Callable[[], object], repeat: int, line_up: Callable[[], None]) -> float:
    """Microseconds that each call of ``fn`` adds to a CUDA graph running it back to back: graphs of
    2 and 10 calls, replayed queued behind ``line_up``, (t10 - t2) / 8. What the graph's start and
    the timing events cost cancels out, leaving each call's kernels and the gaps between them, as
    when the call is one step of a decoding step's graph. (Even counts keep the calls' buffer
    parities alternating from one replay to the next.)"""
    few, many = 2, 10
    graphs = _capture([lambda: [fn() for _ in range(few)], lambda: [fn() for _ in range(many)]])
    t_few, t_many = _medians([g.replay for g in graphs], repeat, set(), line_up)
    return (t_many - t_few) / (many - few)


def _capture(fns: list[Callable[[], object]]) -> list[torch.cuda.CUDAGraph]:
    graphs = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    return graphs


def _time_backend(backend: str, t: int, hidden: int, experts: int, topk: int, repeat: int, hook: bool,
                  line_ups: tuple[Callable[[], None] | None, ...] = (None,), graphs: bool = True,
                  kernels: bool = False, in_graph: bool = False, info: dict | None = None) -> list[list[float]]:
    """For each of ``line_ups`` (None: from idle), the [dispatch, combine] medians, or with ``hook``
    [dispatch send, receive, combine send, receive]; replayed from CUDA graphs, or with
    ``graphs=False`` called eagerly. With ``kernels``, one more list: the steps' summed kernel
    durations (:func:`_kernels_us`), queued behind the first line-up; with ``in_graph`` (no hook),
    one more: what each step adds to a graph that runs it back to back (:func:`_in_graph_us`).
    ``info["presum"]`` (triton): whether the combine summed on the experts' side."""
    from moekit.ep import Buffer

    dev = torch.device("cuda", torch.cuda.current_device())
    rdma = Buffer.get_low_latency_rdma_size_hint(t, hidden, dist.get_world_size(), experts)
    buf = Buffer(None, num_rdma_bytes=rdma, low_latency_mode=True, backend=backend)
    x, idx, weights = _inputs(t, hidden, experts, topk, dist.get_rank(), dev)
    state: dict[str, object] = {}
    if info is not None and backend == "triton":
        info["presum"] = buf._low_latency.presums(t, hidden, experts, topk, hook)

    def dispatch():
        state["d"] = buf.low_latency_dispatch(x, idx, t, experts, use_fp8=True, return_recv_hook=hook)

    def combine():
        res = state["d"]
        y = torch.zeros(res.recv_x[0].shape, dtype=torch.bfloat16, device=dev) if "y" not in state else state["y"]
        state["y"] = y
        state["c"] = buf.low_latency_combine(y, idx, weights, res.handle, return_recv_hook=hook)

    # One eager round compiles the kernels and checks the arguments; the graphs then hold no checks.
    dispatch(), state["d"].hook(), combine(), state["c"].hook()
    torch.cuda.synchronize()
    calls = [dispatch, lambda: state["d"].hook(), combine, lambda: state["c"].hook()]
    if not hook:
        calls = [lambda: (dispatch(), state["d"].hook()), lambda: (combine(), state["c"].hook())]
    settle = {1, 3} if hook else set()
    steps = [g.replay for g in _capture(calls)] if graphs else calls
    medians = [_medians(steps, repeat, settle_before=settle, line_up=line_up) for line_up in line_ups]
    if kernels:
        medians.append([_kernels_us(step, line_ups[0], repeat) for step in steps])
    if in_graph:
        medians.append([_in_graph_us(call, repeat, line_ups[0]) for call in calls])
    torch.cuda.synchronize()
    dist.barrier()
    return medians


def crossing_bytes(topk_idx: list[torch.Tensor], num_experts: int, hidden: int) -> tuple[int, int, int, int]:
    """Bytes that cross NVLink at the busiest rank (the larger of its sends and its receives): dispatch
    as one FP8 message per remote (token, expert) pair, dispatch as moekit sends it (each token
    once per remote rank, an 8-byte header per pair), combine (bf16 rows back per pair), and
    combine summed on the experts' side (a float32 row back per token and remote rank).

    ``topk_idx[s]``: int64 [T, K], the experts of rank s's tokens (-1: none).
    """
    world = len(topk_idx)
    pairs = torch.zeros(world, world, dtype=torch.int64)  # [source, destination] remote (token, expert) pairs
    tokens = torch.zeros(world, world, dtype=torch.int64)  # [source, destination] tokens with an expert there
    for src, idx in enumerate(topk_idx):
        idx = idx.cpu()
        pairs[src] = torch.bincount(idx[idx >= 0] // (num_experts // world), minlength=world)
        tokens[src] = token_ranks(idx, num_experts, world).sum(0)
    pairs.fill_diagonal_(0)
    tokens.fill_diagonal_(0)

    def busiest(per_pair: int, per_token: int = 0) -> int:
        moved = pairs * per_pair + tokens * per_token
        return int(torch.maximum(moved.sum(0), moved.sum(1)).max())

    row = hidden + hidden // 128 * 4
    return busiest(row + 16), busiest(8, row), busiest(2 * hidden), busiest(0, 4 * hidden)


def _rank_main(tokens: list[int], hidden: int, experts: int, topk: int, repeat: int) -> list[dict] | None:
    from moekit.bench._flags import DeviceBarrier, flag_round_trip_us

    group = dist.group.WORLD
    world = dist.get_world_size(group)
    dev = torch.device("cuda", torch.cuda.current_device())
    round_trip = flag_round_trip_us(group, dev)
    queued = _queued(DeviceBarrier(group, dev))
    tiny_idle, tiny_queued, tiny_in_graph = _tiny_graph_us(queued, repeat)
    try:
        from moekit.bench._nvlink import peer_copy_bandwidth_gbps
    except ImportError:
        bandwidth = None
    else:  # the link's rate, from a copy large enough that launch latency does not count
        bandwidth = peer_copy_bandwidth_gbps(256 << 20)
    rows = []
    for t in tokens:
        info: dict = {}
        (triton_d, triton_c), (idle_d, idle_c), (kernels_d, kernels_c), (graph_d, graph_c) = _time_backend(
            "triton", t, hidden, experts, topk, repeat, hook=False, line_ups=(queued, None), kernels=True,
            in_graph=True, info=info)
        halves, idle_halves = _time_backend("triton", t, hidden, experts, topk, repeat, hook=True,
                                            line_ups=(queued, None))
        # The torch backend runs eagerly: its per-call rank check synchronises with the host.
        (torch_d, torch_c), = _time_backend("torch", t, hidden, experts, topk, repeat, hook=False, graphs=False)
        ids = [_inputs(t, hidden, experts, topk, src, dev)[1] for src in range(world)]
        bytes_d, bytes_d_once, bytes_c, bytes_c_summed = crossing_bytes(ids, experts, hidden)
        row = {"tokens": t, "dispatch_us": triton_d, "combine_us": triton_c, "dispatch_idle_us": idle_d,
               "combine_idle_us": idle_c, "dispatch_kernels_us": kernels_d, "combine_kernels_us": kernels_c,
               "dispatch_in_graph_us": graph_d, "combine_in_graph_us": graph_c,
               "torch_dispatch_us": torch_d, "torch_combine_us": torch_c, "dispatch_mb": bytes_d / 1e6,
               "dispatch_once_mb": bytes_d_once / 1e6, "combine_mb": bytes_c / 1e6,
               "combine_summed_mb": bytes_c_summed / 1e6, "combine_summed": "yes" if info["presum"] else "no",
               "flag_rt_us": round_trip,
               "tiny_graph_idle_us": tiny_idle, "tiny_graph_queued_us": tiny_queued,
               "tiny_graph_in_graph_us": tiny_in_graph}
        for name, value, idle in zip(("dispatch_send", "dispatch_recv", "combine_send", "combine_recv"), halves,
                                     idle_halves):
            row[f"{name}_us"], row[f"{name}_idle_us"] = value, idle
        if bandwidth is not None:
            row["peer_gbps"] = bandwidth
            for name, op, nbytes in (("dispatch", "dispatch", bytes_d), ("dispatch_once", "dispatch", bytes_d_once),
                                     ("combine", "combine", bytes_c), ("combine_summed", "combine", bytes_c_summed)):
                floor = nbytes / (bandwidth * 1e3) + round_trip
                row[f"{name}_floor_us"] = floor
                row[f"{name}_x_floor"] = row[f"{op}_us"] / floor
        for op in ("dispatch", "combine"):
            row[f"{op}_speedup"] = row[f"torch_{op}_us"] / row[f"{op}_us"]
        rows.append(row)
    return rows if dist.get_rank() == 0 else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit bench low-latency", description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 128, 256], help="tokens per rank (T)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=50, help="timed graph replays (median reported)")
    parser.add_argument("--ranks", type=int, default=None, help="GPUs (ranks) to use; default: every GPU")
    add_output_args(parser)
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    world = gpus if args.ranks is None else args.ranks
    if not 2 <= world <= gpus:
        print(f"bench low-latency needs 2 or more CUDA GPUs (asked for {world}, found {gpus})")
        return 2
    from moekit.testing.cluster import Cluster

    with Cluster(world, backend="nccl", timeout_s=600) as cluster:
        rows = cluster.run(_rank_main, args.tokens, args.hidden, args.experts, args.topk, args.repeat)[0]
    report = Report(
        title=f"low-latency dispatch (FP8) / combine (bf16), {world} GPUs, H={args.hidden}, top-{args.topk}, "
              f"{args.experts} experts, CUDA-graph replay (us)",
        columns={"tokens": "T",
                 "dispatch_us": "dispatch", "dispatch_in_graph_us": "d in graph", "dispatch_kernels_us": "d kernels",
                 "dispatch_send_us": "d send",
                 "dispatch_recv_us": "d recv", "dispatch_idle_us": "d from idle", "dispatch_floor_us": "d floor",
                 "dispatch_x_floor": "d / floor", "dispatch_once_floor_us": "d floor, once per rank",
                 "dispatch_once_x_floor": "d / that floor", "torch_dispatch_us": "torch d (eager)",
                 "dispatch_speedup": "d speedup",
                 "combine_us": "combine", "combine_summed": "c summed", "combine_in_graph_us": "c in graph",
                 "combine_kernels_us": "c kernels",
                 "combine_send_us": "c send", "combine_recv_us": "c recv", "combine_idle_us": "c from idle",
                 "combine_floor_us": "c floor", "combine_x_floor": "c / floor",
                 "combine_summed_floor_us": "c floor, summed", "combine_summed_x_floor": "c / that floor",
                 "torch_combine_us": "torch c (eager)", "combine_speedup": "c speedup"},
        settings=vars(args) | {"ranks": world},
        rows=rows,
    )
    first = rows[0] if rows else {}
    report.notes.append(f"flag round trip {first.get('flag_rt_us', float('nan')):.2f} us; floor = bytes crossing "
                        "NVLink at the busiest rank / peer copy bandwidth + one flag round trip; hook mode: receive "
                        "timed after every rank's sends completed")
    report.notes.append("times are queued (the device's latency, from a device-side barrier of the ranks, the "
                        "graph's start and the timing events included) unless marked 'from idle' (the replay "
                        "launched on an idle GPU, its launch included); 'in graph': what a call adds to a graph "
                        "that runs it back to back (its kernels and the gaps between them, as one step of a "
                        "larger graph); 'kernels': the call's kernel durations summed, as DeepEP's tests report; a "
                        "graph of one small kernel reads "
                        f"{first.get('tiny_graph_idle_us', float('nan')):.1f} us from idle, "
                        f"{first.get('tiny_graph_queued_us', float('nan')):.1f} us queued, "
                        f"{first.get('tiny_graph_in_graph_us', float('nan')):.1f} us in graph")
    if rows and "dispatch_floor_us" not in first:
        report.notes.append("no floor: moekit.bench._nvlink (peer bandwidth) is not available")
    report.finish(args, x="tokens", series=["dispatch_us", "combine_us", "torch_dispatch_us", "torch_combine_us"],
                  ylabel="us")
    return 0

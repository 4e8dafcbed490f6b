"""Timing helpers: the median of repeated, device-timed runs after a warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch


def median_us(fn: Callable[[], object], *, warmup: int = 5, repeat: int = 30,
              setup: Callable[[], object] | None = None) -> float:
    """Median time of ``fn()`` in microseconds.

    On CUDA each call is bracketed by events on the current stream; on the CPU by a host clock.
    ``setup`` runs before every call, outside the timed region (e.g. to refresh inputs or flush L2).
    """
    return medians_us({"": fn}, warmup=warmup, repeat=repeat, setup=setup)[""]


def medians_us(fns: Mapping[str, Callable[[], object]], *, warmup: int = 5, repeat: int = 30,
               setup: Callable[[], object] | None = None) -> dict[str, float]:
    """Median time in microseconds of each call in ``fns``, timed as :func:`median_us` times one,
    the calls taking turns: every repetition runs each once, starting one further along the list
    each time. A clock that drifts during the run (heat, power) then slows every call alike, so the
    ratios between them hold where separate runs of each could differ by several percent."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            if setup is not None:
                setup()
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeat):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if setup is not None:
                setup()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def back_to_back_us(fn: Callable[[], object], *, warmup: int = 5, repeat: int = 30,
                    before: Callable[[], object] | None = None) -> float:
    """Median microseconds per call of ``repeat`` calls of ``fn()`` issued back to back, each bracketed
    by CUDA events, as DeepEP's tests time their calls: the host queues calls ahead of the device, so
    a call's launch cost is hidden unless the host is the slower of the two. ``before`` runs once
    before the timed calls (e.g. a barrier that lines the ranks up)."""
    for _ in range(warmup):
        fn()
    if before is not None:
        before()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends))


def graph_us(fn: Callable[[], object], *, calls: int = 5, replays: int = 10,
             before: Callable[[], object] | None = None) -> float:
    """Median microseconds per call of ``fn()`` replayed from a CUDA graph of ``calls`` calls: the
    device's own time per call, with no host work between calls. ``fn`` must be capturable and
    already warmed up; ``before`` runs once before the timed replays."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    if before is not None:
        before()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)

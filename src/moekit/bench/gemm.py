"""``python -m moekit bench gemm``: grouped and dense GEMM throughput on DeepGEMM's published shapes.

Rows: dense FP8 (M in {64, 128, 4096} x six (N, K)), contiguous grouped (4 x 8192 and 8 x 4096 rows)
and masked grouped (1 x 1024, 2 x 512, 4 x 256 rows) on (N, K) in {(4096, 7168), (7168, 2048)}.
Each row gives TFLOP/s (2 * valid rows * N * K over the median time, L2 flushed before each call)
of moekit's FP8 and bf16 kernels beside torch's own kernels timed in the same run, the two taking
turns call by call (``torch._scaled_mm`` / ``torch._scaled_grouped_mm`` with row-wise FP8 scales, a cheaper and
coarser scaling than DeepSeek's; ``torch.matmul`` / ``torch._grouped_mm`` in bf16), the ratios to
them, and the fraction of the dense FP8 rate (``torch._scaled_mm``, per-tensor scales, 8192^3)
measured in the same run. ``--sweep`` also times every candidate tile configuration.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
from tqdm import tqdm

from moekit.bench.report import Report, add_output_args
from moekit.bench.timing import medians_us
from moekit.gemm import api, config as tiles, inputs, kernel
from moekit.gemm.layout import contiguous_m_indices

DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE_M = [64, 128, 4096]
GROUPED_NK = [(4096, 7168), (7168, 2048)]
CONTIGUOUS_GM = [(4, 8192), (8, 4096)]
MASKED_GM = [(1, 1024), (2, 512), (4, 256)]


def _try(fn: Callable[[], object]) -> Callable[[], object] | None:
    """``fn`` if it runs here (torch's private GEMMs differ between versions and GPUs), else None."""
    try:
        fn()
        torch.cuda.synchronize()
        return fn
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError):
        return None


class _Timer:
    """Median device time of a call with L2 flushed before each repeat, as TFLOP/s.

    With ``graphs`` each call is captured once in a CUDA graph and the graph is replayed, so the
    time is the kernels' alone: a small GEMM launched eagerly can finish before Python has issued
    the next one, and then the GPU waits for the host (a call that cannot be captured is timed
    eagerly). Calls compared with each other are timed taking turns (:func:`medians_us`)."""

    def __init__(self, repeat: int, graphs: bool = False):
        self.repeat = repeat
        self.graphs = graphs
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def tflops(self, fn: Callable[[], object] | None, flops: float) -> float | None:
        return self.tflops_each({"": fn}, flops)[""]

    def tflops_each(self, fns: dict[str, Callable[[], object] | None], flops: float) -> dict[str, float | None]:
        """TFLOP/s of each call (None for a call that is None: one that does not run here)."""
        runs = {name: _as_graph(fn) if self.graphs else fn for name, fn in fns.items() if fn is not None}
        us = medians_us(runs, warmup=5, repeat=self.repeat, setup=self.flush.zero_) if runs else {}
        return {name: flops / us[name] / 1e6 if name in us else None for name in fns}


def _as_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (after one eager call), or ``fn`` itself if it cannot be captured."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return fn
    return graph.replay


def _dense_fp8_peak(timer: _Timer) -> float | None:
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    return timer.tflops(_try(lambda: torch._scaled_mm(a, b.T, one, one, out_dtype=torch.bfloat16)), 2 * n ** 3)


def _sweep(timer: _Timer, layout: int, fp8: bool, rows_hint: int, a, b, out, flops: float, **index):
    """Best (TFLOP/s, config) over the candidate tile configurations of this regime."""
    a_data, sa = (a if fp8 else (a, None))
    b_data, sb = (b if fp8 else (b, None))
    b3 = b_data if b_data.dim() == 3 else b_data.unsqueeze(0)
    sb3 = sb if sb is None or sb.dim() == 3 else sb.unsqueeze(0)
    best = (0.0, None)
    for config in tiles.candidates(fp8, rows_hint, contiguous=layout == kernel.CONTIGUOUS):
        run = _try(lambda: kernel.launch(layout, a_data, b3, out, config, sa=sa, sb=sb3, **index))
        rate = timer.tflops(run, flops)
        if rate is not None and rate > best[0]:
            best = (rate, config)
    rate, config = best
    if config is None:
        return None, None
    return rate, config.name


def _cases(quick: bool):
    if quick:
        return [("dense", 1, 4096, 4096, 7168), ("contiguous", 8, 4096, 4096, 7168), ("masked", 4, 256, 4096, 7168)]
    cases = [("dense", 1, m, n, k) for n, k in DENSE_NK for m in DENSE_M]
    cases += [("contiguous", g, m, n, k) for n, k in GROUPED_NK for g, m in CONTIGUOUS_GM]
    cases += [("masked", g, m, n, k) for n, k in GROUPED_NK for g, m in MASKED_GM]
    return cases


def _measure(timer: _Timer, kind: str, g: int, m: int, n: int, k: int, sweep: bool) -> dict:
    dev = "cuda"
    flops = 2.0 * g * m * n * k
    row: dict = {"layout": kind, "groups": g, "m": m, "n": n, "k": k}
    if kind == "dense":
        a8, b8 = inputs.activations((m, k), True, dev), inputs.weights((n, k), True, dev)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        sa_row, sb_row = a8[1][:, :1].contiguous(), b8[1][:, :1].repeat_interleave(128, 0)[:n].T.contiguous()
        row.update(timer.tflops_each({
            "fp8": lambda: api.gemm_fp8_nt(a8, b8, out),
            "torch_fp8": _try(lambda: torch._scaled_mm(a8[0], b8[0].T, sa_row, sb_row, out_dtype=torch.bfloat16))},
            flops))
        if sweep:
            row["fp8_best"], row["fp8_cfg"] = _sweep(timer, kernel.DENSE, True, m, a8, b8, out, flops)
        return row
    for fp8 in (True, False):
        key = "fp8" if fp8 else "bf16"
        if kind == "contiguous":
            a = inputs.activations((g * m, k), fp8, dev)
            index = {"m_indices": contiguous_m_indices([m] * g, dev)}
            out = torch.empty(g * m, n, dtype=torch.bfloat16, device=dev)
            ours = lambda: api.m_grouped_gemm_contiguous(a, b, out, index["m_indices"], validate=False)
            layout, offs = kernel.CONTIGUOUS, torch.arange(1, g + 1, device=dev, dtype=torch.int32) * m
        else:
            a = inputs.activations((g, m, k), fp8, dev)
            index = {"masked_m": torch.full((g,), m, dtype=torch.int32, device=dev)}
            out = torch.empty(g, m, n, dtype=torch.bfloat16, device=dev)
            ours = lambda: api.m_grouped_gemm_masked(a, b, out, index["masked_m"], m, validate=False)
            layout, offs = kernel.MASKED, None
        b = inputs.weights((g, n, k), fp8, dev)
        if fp8:
            sa_row = a[1][..., 0].contiguous()
            sb_row = b[1][:, :, 0].repeat_interleave(128, 1)[:, :n].contiguous()
            theirs = _try(lambda: torch._scaled_grouped_mm(
                a[0], b[0].transpose(-2, -1), sa_row, sb_row, offs=offs, out_dtype=torch.bfloat16))
        else:
            theirs = _try(lambda: torch._grouped_mm(a, b.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16))
        row.update(timer.tflops_each({key: ours, f"torch_{key}": theirs}, flops))
        if sweep:
            row[f"{key}_best"], row[f"{key}_cfg"] = _sweep(timer, layout, fp8, m, a, b, out, flops, **index)
        a = b = out = None  # free this dtype's operands before the next one
    return row


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _median_row(rows: list[dict]) -> dict:
    """One row from the same case measured in several rounds: the median of each number, the first
    round's labels (a best tile config is the first round's)."""
    merged = dict(rows[0])
    for key, value in merged.items():
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if isinstance(value, float) and values:
            merged[key] = statistics.median(values)
    return merged


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit bench gemm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three shapes (one per layout), fewer repeats")
    parser.add_argument("--sweep", action="store_true", help="also time every candidate tile configuration")
    parser.add_argument("--repeat", type=int, default=50, help="timed calls per measurement (median)")
    parser.add_argument("--graphs", action="store_true",
                        help="time CUDA-graph replays of each call (the kernels alone, without Python's launch cost)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every shape this many times, one pass over all shapes after another, and "
                             "report the medians (a GPU whose clock drifts during the run slows every shape alike)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench gemm needs a CUDA GPU (Hopper for the FP8 rows)")
        return 1
    torch.manual_seed(0)
    timer = _Timer(10 if args.quick else args.repeat, graphs=args.graphs)
    peak = _dense_fp8_peak(timer)
    columns = {"layout": "layout", "groups": "G", "m": "rows/G", "n": "N", "k": "K",
               "fp8": "FP8 TFLOP/s", "torch_fp8": "torch FP8 row-wise", "fp8_vs_torch": "FP8 / torch",
               "fp8_of_peak": "FP8 / dense peak", "bf16": "bf16 TFLOP/s", "torch_bf16": "torch bf16",
               "bf16_vs_torch": "bf16 / torch"}
    if args.sweep:
        columns.update({"fp8_best": "FP8 best cfg", "fp8_cfg": "FP8 cfg", "bf16_best": "bf16 best cfg",
                        "bf16_cfg": "bf16 cfg"})
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive int, got {args.rounds}")
    report = Report("moekit.gemm vs torch (TFLOP/s)", columns,
                    settings={"quick": args.quick, "repeat": timer.repeat, "rounds": args.rounds, "graphs": args.graphs,
                              "dense_fp8_peak_tflops": peak})
    cases = _cases(args.quick)
    measured: list[list[dict]] = [[] for _ in cases]
    with tqdm(total=args.rounds * len(cases), desc="gemm shapes") as progress:
        for _ in range(args.rounds):
            for i, case in enumerate(cases):
                measured[i].append(_measure(timer, *case, sweep=args.sweep))
                torch.cuda.empty_cache()
                progress.update()
    for rows in measured:
        row = _median_row(rows)
        row["fp8_vs_torch"] = _ratio(row.get("fp8"), row.get("torch_fp8"))
        row["bf16_vs_torch"] = _ratio(row.get("bf16"), row.get("torch_bf16"))
        row["fp8_of_peak"] = _ratio(row.get("fp8"), peak)
        report.add(**row)
    peak_text = f"{peak:.0f}" if peak else "n/a"
    report.notes.append(f"dense FP8 peak (torch._scaled_mm per-tensor, 8192^3) in this run: {peak_text} TFLOP/s; "
                        f"device {torch.cuda.get_device_name()}")
    report.finish(args, x="m", series=["fp8", "torch_fp8", "bf16", "torch_bf16"], group="layout",
                  ylabel="TFLOP/s")
    return 0

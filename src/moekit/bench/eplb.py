"""EPLB benchmark: runtime and balance of the ``greedy`` and ``refined`` placement modes side by side.

Balance is max GPU load / mean GPU load per layer (1.0 is perfect), averaged over layers. Sizes are
DeepSeek-V3-like (61 MoE layers, 256 experts in 8 groups); loads are Zipf-like (a permuted power
law per layer) or measured-looking (per-layer token counts drawn around a shared log-normal
popularity).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from tqdm import tqdm

from moekit.bench.report import Report, add_output_args
from moekit.bench.timing import median_us
from moekit.eplb import imbalance, rebalance_experts


@dataclass(frozen=True)
class Case:
    name: str
    layers: int
    experts: int
    replicas: int
    groups: int
    nodes: int
    gpus: int


CASES = (
    Case("256E>288R 4x8", 61, 256, 288, 8, 4, 32),
    Case("256E>320R 1x8", 61, 256, 320, 8, 1, 8),
)
LOADS = ("zipf", "measured")


def make_loads(kind: str, layers: int, experts: int, seed: int, tokens: int = 16384, topk: int = 8) -> torch.Tensor:
    """int64 [layers, experts] token counts of one step of ``tokens`` tokens routed to ``topk`` experts."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "zipf":
        rank = torch.arange(1, experts + 1, dtype=torch.float64)
        popularity = torch.stack([(rank ** -1.1)[torch.randperm(experts, generator=gen)] for _ in range(layers)])
    elif kind == "measured":
        shared = torch.randn(experts, generator=gen, dtype=torch.float64)
        per_layer = torch.randn(layers, experts, generator=gen, dtype=torch.float64)
        popularity = torch.exp(0.8 * shared + 0.6 * per_layer)
    else:
        raise ValueError(f"loads must be one of {LOADS}, got {kind!r}")
    probs = popularity / popularity.sum(-1, keepdim=True)
    picks = torch.multinomial(probs, tokens * topk, replacement=True, generator=gen)
    return torch.zeros(layers, experts, dtype=torch.int64).scatter_add_(1, picks, torch.ones_like(picks))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit bench eplb", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per mode and case (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the tensors are small: more threads mostly add contention)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    repeat = 3 if args.quick else args.repeat
    torch.set_num_threads(args.threads)

    report = Report(
        title="EPLB: greedy (published) vs refined (default)",
        # balances differ in the third decimal: printed as 4-decimal text, stored as floats too
        columns={"case": "case", "loads": "loads", "greedy_ms": "greedy ms", "refined_ms": "refined ms",
                 "greedy_text": "greedy max/mean", "refined_text": "refined max/mean",
                 "ratio_text": "refined/greedy", "layers_lower": "layers lower"},
        settings={"repeat": repeat, "seed": args.seed, "threads": torch.get_num_threads(),
                  "cases": [c.__dict__ for c in CASES]},
    )
    jobs = [(case, kind) for case in CASES for kind in LOADS]
    for index, (case, kind) in enumerate(tqdm(jobs, desc="eplb", unit="case")):
        weight = make_loads(kind, case.layers, case.experts, args.seed + index)
        shape = (case.replicas, case.groups, case.nodes, case.gpus)
        row: dict[str, object] = {"index": index, "case": case.name,
                                  "loads": kind}
        balance = {}
        for mode in ("greedy", "refined"):
            phy2log = rebalance_experts(weight, *shape, mode=mode)[0]
            balance[mode] = imbalance(weight, phy2log, case.gpus)
            row[f"{mode}_ms"] = median_us(lambda m=mode: rebalance_experts(weight, *shape, mode=m),
                                          warmup=1, repeat=repeat) / 1e3
            row[f"{mode}_balance"] = float(balance[mode].mean())
            row[f"{mode}_text"] = f"{row[f'{mode}_balance']:.4f}"
        row["ratio"] = row["refined_balance"] / row["greedy_balance"]
        row["ratio_text"] = f"{row['ratio']:.4f}"
        lower = int((balance["refined"] < balance["greedy"] * (1 - 1e-9)).sum())
        row["layers_lower"] = f"{lower}/{case.layers}"
        report.add(**row)
    report.notes.append("max/mean: max GPU load / mean GPU load per layer, averaged over layers (1.0 is perfect); "
                        "ms: median wall time of one rebalance of all layers on the CPU; "
                        "case: experts > replicas, nodes x GPUs per node (8 expert groups, 61 layers).")
    report.finish(args, x="index", series=["greedy_balance", "refined_balance"], ylabel="max/mean GPU load",
                  logx=False)
    return 0

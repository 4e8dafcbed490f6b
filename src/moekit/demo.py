"""``python -m moekit demo``: an expert-parallel MoE layer's forward pass on N ranks, checked
against the same layer computed in one process.

On a machine with CUDA GPUs it runs one rank per GPU over NCCL; otherwise N CPU processes over gloo.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from moekit.moe import ExpertParallelMoE, MoEConfig, build_full_layer, moe_reference
from moekit.testing.cluster import Cluster

# Relative error allowed between the expert-parallel and one-process results: both round to bf16,
# the expert-parallel path once more (partial sums travel as bf16).
TOLERANCE = 2e-2


def rank_forward(config: MoEConfig, tokens: int, steps: int, backend: str, mode: str) -> dict:
    """Runs on every rank: the layer's forward ``steps`` times, then the check against one process."""
    from moekit.ep import Buffer

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    router, experts = build_full_layer(config, device)
    local = type(experts)(config.num_experts // world, config.hidden, config.ffn_hidden).to(device)
    per_rank = config.num_experts // world
    local.gate_up.data.copy_(experts.gate_up.data[rank * per_rank:(rank + 1) * per_rank])
    local.down.data.copy_(experts.down.data[rank * per_rank:(rank + 1) * per_rank])
    hidden_bytes = config.hidden * 2
    nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, world)
              for c in (Buffer.get_dispatch_config(world), Buffer.get_combine_config(world)))
    rdma = Buffer.get_low_latency_rdma_size_hint(tokens, config.hidden, world, config.num_experts)
    buffer = Buffer(None, num_nvl_bytes=nvl, num_rdma_bytes=rdma, low_latency_mode=mode == "low-latency",
                    backend=backend)
    layer = ExpertParallelMoE(buffer, router, local, config.num_experts, mode=mode, max_tokens=tokens)

    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    # Uneven token counts exercise uneven traffic; from 4 ranks up, the last rank sends nothing.
    n = 0 if world >= 4 and rank == world - 1 else tokens * (world - rank) // world
    x = torch.randn(n, config.hidden, generator=gen, device=device).to(torch.bfloat16)
    times = []
    for _ in range(steps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ref = moe_reference(x, router, experts)
    diff = (out.float() - ref.float())
    rel = float(diff.norm() / ref.float().norm()) if n else 0.0
    return {"rank": rank, "tokens": n, "ms": statistics.median(times) * 1e3,
            "max_abs_err": float(diff.abs().max()) if n else 0.0, "rel_err": rel, "backend": buffer.backend,
            "device": str(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moekit demo", description=__doc__)
    parser.add_argument("--ranks", type=int, default=None,
                        help="number of ranks (default: every GPU, or 4 CPU processes without CUDA)")
    parser.add_argument("--backend", default="auto", help="EP backend: auto (fastest available) or torch")
    parser.add_argument("--mode", choices=("normal", "low-latency"), default="normal")
    parser.add_argument("--tokens", type=int, default=64, help="tokens on rank 0 (others get fewer)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn-hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ranks = args.ranks or (gpus if gpus else 4)
    if gpus and ranks > gpus:
        parser.error(f"--ranks: {ranks} ranks need {ranks} GPUs, this machine has {gpus}")
    if args.experts % ranks:
        parser.error(f"--experts: {args.experts} experts cannot be split evenly over {ranks} ranks")
    if not 1 <= args.topk <= args.experts:
        parser.error(f"--topk: expected 1..{args.experts}, got {args.topk}")
    config = MoEConfig(args.hidden, args.ffn_hidden, args.experts, args.topk)
    console = Console()
    console.print(f"moekit demo: {ranks} rank(s) over {'NCCL on GPUs' if gpus else 'gloo on CPU processes'}, "
                  f"{args.mode} mode ...")
    with Cluster(ranks, backend="nccl" if gpus else "gloo") as cluster:
        results = cluster.run(rank_forward, config, args.tokens, args.steps, args.backend, args.mode)

    table = Table(title=f"MoE forward ({args.mode}; hidden {args.hidden}, {args.experts} experts, top-{args.topk}) "
                        "vs one process", title_justify="left")
    for col in ("rank", "device", "backend", "tokens", "ms/step", "max |err|", "rel err"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in results:
        table.add_row(str(r["rank"]), r["device"], r["backend"], str(r["tokens"]), f"{r['ms']:.2f}",
                      f"{r['max_abs_err']:.1e}", f"{r['rel_err']:.1e}")
    console.print(table)
    worst = max(r["rel_err"] for r in results)
    ok = worst <= TOLERANCE
    console.print(f"check: {'PASS' if ok else 'FAIL'} (largest relative error {worst:.2e}, allowed {TOLERANCE:.0e})")
    return 0 if ok else 1

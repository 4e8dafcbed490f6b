"""``python -m moekit info``: what this machine offers to moekit."""

from __future__ import annotations

import argparse
import os
import platform

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def gather() -> dict:
    """Versions, devices, peer access and usable backends, as a dict."""
    from moekit.ep import available_backends

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "numpy": _version("numpy"), "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": None, "gpus": [], "peer_access": [], "ep_backends": available_backends(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    if torch.cuda.is_available():
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        count = torch.cuda.device_count()
        for i in range(count):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "sms": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"})
        info["peer_access"] = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(count)]
                               for i in range(count)]
    return info


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m moekit info", description=__doc__).parse_args(argv)
    info = gather()
    console = Console()
    table = Table(title="moekit info", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for key in ("python", "torch", "triton", "numpy"):
        table.add_row(key, str(info[key]))
    table.add_row("gloo (CPU collectives)", "yes" if info["gloo"] else "no")
    table.add_row("NCCL", info["nccl"] or "no CUDA")
    if info["gpus"]:
        for g in info["gpus"]:
            table.add_row(f"GPU {g['index']}", f"{g['name']}, {g['memory_gib']} GiB, {g['sms']} SMs, sm_{g['capability']}")
        peers = "all pairs" if all(all(row) for row in info["peer_access"]) else str(info["peer_access"])
        table.add_row("peer access", peers)
    else:
        table.add_row("GPUs", "none (CPU ranks over gloo)")
    table.add_row("EP backends", ", ".join(info["ep_backends"]))
    table.add_row("TRITON_INTERPRET", "on" if info["triton_interpret"] else "off")
    console.print(table)
    return 0

"""Which engines do the work behind ``Buffer``.

A backend is a pair of engines: one for high-throughput mode (``dispatch`` / ``combine``) and one for
low-latency mode. ``torch`` (collectives only) runs everywhere and defines correct results;
``triton`` (kernels writing into peers' memory on a symmetric heap) runs on GPUs of one host with
peer access, and under ``TRITON_INTERPRET=1`` on CPU ranks over a simulated heap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moekit.ep.heap import interpreting
from moekit.ep.torch_backend import TorchDispatcher
from moekit.ep.torch_low_latency import TorchLowLatency


@dataclass
class EngineSettings:
    """What a Buffer tells its engines: buffer sizes and the time limit of every wait across ranks."""

    num_nvl_bytes: int
    num_rdma_bytes: int
    low_latency_mode: bool
    timeout_s: float


def _triton_engines_importable() -> bool:
    try:
        import moekit.ep.triton_low_latency  # noqa: F401
        import moekit.ep.triton_normal  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(group: dist.ProcessGroup, device: torch.device) -> bool:
    """The triton backend needs every rank of the group on GPUs of one host with peer access (or
    the interpreter on CPU ranks)."""
    if not _triton_engines_importable():
        return False
    if device.type == "cpu":
        return interpreting()
    if interpreting() or device.type != "cuda":
        return False
    world = dist.get_world_size(group)
    if world > torch.cuda.device_count():
        return False  # ranks span hosts
    here = device.index
    return all(p == here or torch.cuda.can_device_access_peer(here, p) for p in range(torch.cuda.device_count()))


def available_backends(group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> list[str]:
    """Backends that can run for ``group`` on ``device``, fastest first (all known ones if not given).

    On CPU ranks the interpreted triton backend is a test vehicle, far slower than torch: it comes last.
    """
    if group is None or device is None:
        return ["triton", "torch"] if _triton_engines_importable() else ["torch"]
    if not triton_usable(group, device):
        return ["torch"]
    return ["torch", "triton"] if device.type == "cpu" else ["triton", "torch"]


def make_engines(name: str, group: dist.ProcessGroup, device: torch.device, settings: EngineSettings) -> tuple[Any, Any]:
    """(high-throughput engine, low-latency engine) of backend ``name``."""
    if name == "torch":
        return TorchDispatcher(group, device), TorchLowLatency(group, device)
    if name == "triton":
        from moekit.ep.triton_low_latency import TritonLowLatency
        from moekit.ep.triton_normal import TritonDispatcher

        return TritonDispatcher(group, device, settings), TritonLowLatency(group, device, settings)
    raise ValueError(f"backend: unknown backend {name!r}")

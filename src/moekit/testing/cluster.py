"""A group of worker processes, one per rank, that run functions together (tests and the demo).

The workers join one ``torch.distributed`` group (gloo on CPUs, NCCL on GPUs, one GPU per rank) and
stay up between calls, so that many checks share one start-up. ``run(fn, *args)`` calls
``fn(*args)`` on every rank at once and returns the per-rank results; a failure on any rank raises
:class:`RankError` with every failing rank's traceback, and a rank that does not answer within the
time limit raises ``TimeoutError`` naming it, with the Python stack it was stuck in (the group is
then torn down).
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

# NVLink multicast stays off in every process we start (it can take a shared host's GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class RankError(RuntimeError):
    """One or more ranks raised; ``errors`` maps rank to its traceback text."""

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = errors
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        super().__init__(f"{len(errors)} rank(s) failed:\n{text}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stack_file(folder: str, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.stack"


def _worker(rank: int, world_size: int, port: int, backend: str, timeout_s: float, env: dict[str, str],
            stacks: str, inbox: "mp.Queue", outbox: "mp.Queue") -> None:
    # On SIGUSR1 (sent by the parent when this rank does not answer in time) every thread's stack
    # goes to a file the parent reads, so a hang says where it hangs.
    stack_file = _stack_file(stacks, rank).open("w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    os.environ.update(SAFE_ENV)
    os.environ.update(env)
    os.environ["OMP_NUM_THREADS"] = os.environ.get("MOEKIT_WORKER_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device_id = None
    if backend == "nccl":
        device_id = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        outbox.put((rank, False, traceback.format_exc()))
        return
    outbox.put((rank, True, None))
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Cluster:
    """``world_size`` worker processes joined in one process group.

    Args:
        world_size: number of ranks.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per rank).
        timeout_s: limit for one collective inside the workers and for one ``run`` to answer.
        env: environment variables set in the workers before anything runs (e.g. TRITON_INTERPRET).
    """

    def __init__(self, world_size: int, backend: str = "gloo", timeout_s: float = 120.0,
                 env: dict[str, str] | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        self.world_size, self.backend, self.timeout_s = world_size, backend, timeout_s
        ctx = mp.get_context("spawn")
        port = free_port()
        self._stacks = tempfile.mkdtemp(prefix="moekit-cluster-")
        self._inboxes = [ctx.Queue() for _ in range(world_size)]
        self._outbox = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(r, world_size, port, backend, timeout_s, dict(env or {}), self._stacks,
                                         self._inboxes[r], self._outbox))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        # Spawning and importing torch can take a while on a busy machine, whatever the run limit.
        self._collect("start-up", limit_s=max(timeout_s, 180.0))

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Runs ``fn(*args, **kwargs)`` on every rank (``fn`` must be importable: a module-level function)."""
        if not self.alive:
            raise RuntimeError(f"{getattr(fn, '__name__', repr(fn))}: this cluster's ranks are gone (closed, or an "
                               "earlier run timed out or lost a rank); start a new Cluster")
        for box in self._inboxes:
            box.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", repr(fn)))

    def _collect(self, what: str, limit_s: float | None = None) -> list[Any]:
        limit_s = self.timeout_s if limit_s is None else limit_s
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(results) + len(errors) < self.world_size:
            try:
                rank, ok, value = self._outbox.get(timeout=limit_s)
            except queue.Empty:
                missing = sorted(set(range(self.world_size)) - set(results) - set(errors))
                stacks = self._dump_stacks(missing)
                self.close(force=True)
                raise TimeoutError(f"{what}: rank(s) {missing} did not answer within {limit_s:.0f} s"
                                   + (f"; other ranks failed: {RankError(errors)}" if errors else "")
                                   + stacks) from None
            (results if ok else errors)[rank] = value
        if errors:
            raise RankError(errors)
        return [results[r] for r in range(self.world_size)]

    def _dump_stacks(self, ranks: list[int], lines: int = 40) -> str:
        """The last ``lines`` lines of each of ``ranks``' Python stacks, asked for with SIGUSR1."""
        for r in ranks:
            if self._procs[r].is_alive():
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        time.sleep(1.0)
        text = ""
        for r in ranks:
            dump = _stack_file(self._stacks, r).read_text(errors="replace").splitlines()[-lines:]
            text += f"\n--- rank {r} stack ---\n" + ("\n".join(dump) if dump else "(no stack: the process had exited)")
        return text

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def close(self, force: bool = False) -> None:
        if not force:
            for box in self._inboxes:
                box.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
        self._procs = []
        shutil.rmtree(self._stacks, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(force=exc[0] is not None)

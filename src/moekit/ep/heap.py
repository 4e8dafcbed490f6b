"""Symmetric heaps: one equally laid-out byte buffer per rank, and a table of every rank's base
address that kernels use to load from and store to peers directly.

* On GPUs the buffers come from torch's symmetric memory (CUDA backend): peers' buffers are mapped
  into each process, so a Triton kernel stores over NVLink with an ordinary pointer.
* On CPUs (tests, with ``TRITON_INTERPRET=1``) each rank process creates a shared-memory file and
  maps every peer's; the same Triton kernels then run under the interpreter, one process per rank,
  truly concurrently, and their waits on peers' flags behave as on GPUs.

In both, ``ptrs[r]`` is rank r's base address as seen by this process, so kernel code is the same.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import torch
import torch.distributed as dist


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class SymmetricHeap:
    """``nbytes`` of memory on every rank of ``group``, zeroed at creation.

    Attributes:
        local: uint8 [nbytes], this rank's buffer.
        ptrs: int64 [R] on this rank's device: every rank's base address, valid in this process.
        peers: every rank's buffer as a uint8 [nbytes] tensor of this process (``local`` for this
            rank), for copies into peers' memory (the copy engine's path over NVLink on GPUs).
        rank, world_size, nbytes.
    """

    def __init__(self, group: dist.ProcessGroup, nbytes: int, device: torch.device) -> None:
        if nbytes <= 0:
            raise ValueError(f"nbytes: expected > 0, got {nbytes}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.nbytes = nbytes
        self.device = device
        if device.type == "cuda":
            self.local, self.ptrs = self._map_cuda()
            self.peers = [self.local if r == self.rank else self._handle.get_buffer(r, (nbytes,), torch.uint8)
                          for r in range(self.world_size)]
        elif interpreting():
            self.local, self.ptrs = self._map_shared_files()
            self.peers = self._mapped
        else:
            raise RuntimeError("a symmetric heap needs CUDA GPUs, or TRITON_INTERPRET=1 for the simulated one")
        self.local.zero_()
        self.barrier()

    def _map_cuda(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed._symmetric_memory as symm_mem

        local = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self._handle = symm_mem.rendezvous(local, self.group)
        ptrs = torch.tensor(list(self._handle.buffer_ptrs), dtype=torch.int64, device=self.device)
        return local, ptrs

    def _map_shared_files(self) -> tuple[torch.Tensor, torch.Tensor]:
        names = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=dist.get_global_rank(self.group, 0), group=self.group)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        paths = [os.path.join(folder, f"moekit-heap-{names[0]}-{r}") for r in range(self.world_size)]
        with open(paths[self.rank], "wb") as f:
            f.truncate(self.nbytes)
        dist.barrier(group=self.group)
        # The mappings keep the memory alive after the files are unlinked.
        self._mapped = [torch.from_file(p, shared=True, size=self.nbytes, dtype=torch.uint8) for p in paths]
        dist.barrier(group=self.group)
        os.unlink(paths[self.rank])
        ptrs = torch.tensor([m.data_ptr() for m in self._mapped], dtype=torch.int64)
        return self._mapped[self.rank], ptrs

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor over this rank's bytes [offset, offset + size)."""
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset + size > self.nbytes or offset % 16:
            raise ValueError(f"heap view [{offset}, {offset + size}) is outside the {self.nbytes}-byte heap "
                             "or not 16-byte aligned")
        return self.local[offset:offset + size].view(dtype).view(shape)

    def barrier(self) -> None:
        """Host-side barrier of the group (setup only; kernels synchronise through flags)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)


class HeapLayout:
    """Hands out 128-byte-aligned regions of a heap, in order; the same on every rank."""

    ALIGN = 128

    def __init__(self) -> None:
        self.size = 0
        self.regions: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        offset = self.size
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.regions[name] = (offset, tuple(shape), dtype)
        self.size = offset + (nbytes + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        return offset

    def views(self, heap: SymmetricHeap) -> dict[str, torch.Tensor]:
        return {name: heap.view(off, shape, dtype) for name, (off, shape, dtype) in self.regions.items()}

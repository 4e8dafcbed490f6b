"""Flags between ranks on a symmetric heap: signal a peer, wait for one with a time limit.

Rules every kernel follows (they keep the simulated heap, where ranks are processes running the
interpreter, faithful to GPUs):
* a flag word is written from ONE rank: by one program, or by several programs of that rank that
  each add their share atomically (the low-latency arrival counts; under the interpreter a rank's
  programs run one after another, so no other process races them); readers combine several words;
* flags are int64 and only grow (an epoch per call), so they never need resetting;
* a kernel waits only for flags set by other ranks or by earlier launches, never by another
  program of its own launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# What a timed-out wait writes into the error record: [timed_out, op, rank, peer]. A receiver that
# finds a peer's call different from its own (sizes, formats) writes [MISMATCH, op, rank, peer].
ERROR_WORDS = 4
MISMATCH = 2
OPS = ("dispatch", "combine", "low_latency_dispatch", "low_latency_combine", "notify", "barrier")


def op_code(name: str) -> int:
    return OPS.index(name)


def wait_budget(timeout_s: float, interpret: bool) -> int:
    """The ``max_wait`` of :func:`wait_geq`: nanoseconds on GPUs, polls under the interpreter (which
    polls about ten thousand times a second)."""
    return int(timeout_s * (1e4 if interpret else 1e9))


@triton.jit
def peer_pointer(ptrs, peer, byte_offset, DTYPE: tl.constexpr):
    """Pointer to ``byte_offset`` in rank ``peer``'s heap, typed ``DTYPE``."""
    base = tl.load(ptrs + peer)
    return (base + byte_offset).to(tl.pointer_type(DTYPE))


@triton.jit
def signal(flag_ptr, value):
    """Makes this program's earlier stores visible system-wide, then sets the flag (release)."""
    tl.atomic_xchg(flag_ptr, value, sem="release", scope="sys")


@triton.jit
def signal_where(flag_ptrs, values, mask):
    """:func:`signal` for a block of flags, each lane under ``mask``."""
    tl.atomic_xchg(flag_ptrs, values, mask=mask, sem="release", scope="sys")


@triton.jit
def poll(flag_ptr, INTERPRET: tl.constexpr, LOAD: tl.constexpr = False):
    """Reads a flag (or a block of flags) with acquire ordering at system scope, without writing
    it: a compare-and-swap that never matches (flags are >= 0), so a concurrent writer's update is
    never lost; with ``LOAD`` (on GPUs) a plain ``ld.acquire.sys``, one load per poll.

    The two differ in who reads. Triton performs an atomic once per element and hands the result
    to every thread that holds a copy of it, so all warps of a program see one value. A block of
    flags smaller than the program (a few lanes, copied into every warp) is loaded by each warp on
    its own with ``LOAD``, and while a writer is raising a flag, warps can read different values.
    So ``LOAD`` suits only waits where each warp may act on its own reading: the low-latency
    receives wait until every flag reached a threshold, then each warp copies its share (their
    receives got up to 2.8 us faster). The high-throughput dispatch receive keeps the
    compare-and-swap: it derives from the flags which rows to copy next, and every warp must copy
    its part of the same rows (with ``LOAD`` its GPU tests lost rows, 2 x H200, 2026-11-23)."""
    if INTERPRET or not LOAD:
        # The operands take the pointer's shape: atomic_cas does not broadcast scalars to a block.
        never = tl.full(flag_ptr.shape, -1, tl.int64)
        return tl.atomic_cas(flag_ptr, never, never, sem="acquire", scope="sys")
    else:
        return tl.inline_asm_elementwise("ld.acquire.sys.global.b64 $0, [$1];", "=l,l", [flag_ptr], dtype=tl.int64,
                                         is_pure=False, pack=1)


@triton.jit
def record_timeout(error_ptr, op, rank, peer):
    """Records ``[1, op, rank, peer]`` at ``error_ptr`` for the host to raise (the first word last)."""
    tl.atomic_xchg(error_ptr + 1, op)
    tl.atomic_xchg(error_ptr + 2, rank)
    tl.atomic_xchg(error_ptr + 3, peer)
    tl.atomic_xchg(error_ptr, 1)


@triton.jit
def wait_geq(flag_ptr, target, max_wait, error_ptr, op, rank, peer, INTERPRET: tl.constexpr):
    """Spins until ``*flag_ptr >= target``; returns whether it arrived.

    Gives up after ``max_wait`` (see ``wait_budget``) and then records ``[1, op, rank, peer]`` at
    ``error_ptr`` for the host to raise.
    """
    value = poll(flag_ptr, INTERPRET)
    if INTERPRET:
        start = 0
    else:
        start = tl.extra.cuda.globaltimer()
    waited = start - start
    while (value < target) & (waited < max_wait):
        value = poll(flag_ptr, INTERPRET)
        if INTERPRET:
            waited += 1
        else:
            waited = tl.extra.cuda.globaltimer() - start
    arrived = value >= target
    if not arrived:
        record_timeout(error_ptr, op, rank, peer)
    return arrived


@triton.jit
def wait_all(flag_ptrs, mask, target, peers, max_wait, error_ptr, op, rank, INTERPRET: tl.constexpr,
             LOAD: tl.constexpr = False):
    """Vector form of :func:`wait_geq`: spins until every flag under ``mask`` is ``>= target``;
    returns the flags' last values (``target`` where masked off), so that a caller that needs them
    does not read the flags again.

    ``flag_ptrs`` must be valid addresses in every lane (masked-off lanes are polled but ignored);
    ``peers`` (same shape) names the rank that sets each flag, for the error record. One poll of a
    block of flags per spin instead of one wait per flag keeps a wait for many writers cheap.
    ``LOAD``: poll with plain acquire loads (see :func:`poll`).
    """
    values = tl.where(mask, poll(flag_ptrs, INTERPRET, LOAD), target)
    if INTERPRET:
        start = 0
    else:
        start = tl.extra.cuda.globaltimer()
    waited = start - start
    while (tl.min(values, axis=0) < target) & (waited < max_wait):
        values = tl.where(mask, poll(flag_ptrs, INTERPRET, LOAD), target)
        if INTERPRET:
            waited += 1
        else:
            waited = tl.extra.cuda.globaltimer() - start
    if tl.min(values, axis=0) < target:
        record_timeout(error_ptr, op, rank, tl.min(tl.where(values < target, peers, 1 << 30), axis=0))
    return values


@triton.jit
def wait_all_geq(flag_ptrs, mask, target, peers, max_wait, error_ptr, op, rank, INTERPRET: tl.constexpr):
    """:func:`wait_all` that returns whether every flag arrived."""
    values = wait_all(flag_ptrs, mask, target, peers, max_wait, error_ptr, op, rank, INTERPRET)
    return tl.min(values, axis=0) >= target


@triton.jit
def error_pointer(error_addr):
    """The error record's address (an int64 kernel argument) as a pointer."""
    return error_addr.to(tl.pointer_type(tl.int64))


class ErrorRecord:
    """Where kernels report a wait that gave up: ``[timed_out, op, rank, peer]`` int64 words.

    On GPUs it lives in pinned host memory, which kernels can write directly (unified addressing),
    so the host checks it with a plain memory read: no device synchronisation, CUDA-graph safe.
    Kernels receive ``address`` as an int64 argument and turn it into a pointer with
    :func:`error_pointer`.
    """

    def __init__(self, device: torch.device) -> None:
        self.words = torch.zeros(ERROR_WORDS, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.address = self.words.data_ptr()
        # A NumPy view of the same memory: every EP call reads it, and indexing it costs far less
        # than indexing the tensor.
        self._host = self.words.numpy()

    def check(self, timeout_s: float) -> None:
        """Raises ``TimeoutError`` naming the op, rank and peer if a wait gave up, or ``ValueError``
        naming both ranks if a peer's call disagreed with this rank's (and clears the record)."""
        kind = int(self._host[0])
        if kind:
            op, rank, peer = (int(w) for w in self._host[1:])
            self.words.zero_()
            name = OPS[op] if 0 <= op < len(OPS) else f"op {op}"
            if kind == MISMATCH:
                raise ValueError(f"{name}: ranks {rank} and {peer} disagree on the call (sizes, top-k or formats: "
                                 f"rank {rank} received from rank {peer} a call unlike its own); every rank must "
                                 "pass the same")
            raise TimeoutError(f"{name}: rank {rank} waited more than {timeout_s:g} s for rank {peer}; "
                               f"is rank {peer} alive and calling {name} too?")

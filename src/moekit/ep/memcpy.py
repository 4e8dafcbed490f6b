"""Byte copies between addresses of this process, for the engines' copy-engine paths.

On GPUs a copy is one ``cuMemcpyDtoDAsync`` on a given stream, called through ctypes: that costs the
host a microsecond or two, where slicing two tensors and calling ``copy_`` costs ten or more (a
copy-engine combine issues nine copies per call, and at 4096 tokens its host time exceeded its
device time). Peers' heap buffers are mapped into this process's address space, so the driver
moves those bytes over NVLink like any device-to-device copy, and a copy issued during CUDA-graph
capture is captured. Under the interpreter, where the simulated heap is host memory, the copy is a
plain ``memmove``.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _driver_copy():
    copy = ctypes.CDLL("libcuda.so.1").cuMemcpyDtoDAsync_v2
    copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    copy.restype = ctypes.c_int
    return copy


def copy_bytes(dst: int, src: int, nbytes: int, stream: int | None) -> None:
    """Copies ``nbytes`` from address ``src`` to address ``dst``: enqueued on the CUDA stream whose
    handle is ``stream`` (``torch.cuda.Stream.cuda_stream``), or at once in host memory when
    ``stream`` is None."""
    if nbytes <= 0:
        return
    if stream is None:
        ctypes.memmove(dst, src, nbytes)
        return
    status = _driver_copy()(dst, src, nbytes, stream)
    if status:
        raise RuntimeError(f"cuMemcpyDtoDAsync of {nbytes} bytes failed with CUDA driver error {status}")

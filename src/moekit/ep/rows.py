"""Moving rows of several tensors between ranks in one ``all_to_all_single`` (torch backend).

Rows of different dtypes travel together as bytes: each tensor [n, ...] is viewed as uint8 [n, b],
the views are concatenated along columns, exchanged, and split back. One collective per exchange
keeps the reference backend's latency down and its code short.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist


def _row_elements(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, ...] any dtype -> uint8 [n, row bytes] (copies only if not already contiguous)."""
    return t.reshape(t.shape[0], _row_elements(t)).contiguous().view(torch.uint8)


def pack_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([as_bytes(t) for t in tensors], dim=1)


def unpack_rows(rows: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Splits uint8 [m, b] back into tensors shaped like ``like`` (row count m instead of theirs)."""
    out, col = [], 0
    for t in like:
        width = _row_elements(t) * t.element_size()
        # A fresh buffer: slices of ``rows`` (even empty ones) have strides and offsets that cannot be
        # reinterpreted as wider dtypes.
        piece = rows.new_empty((rows.shape[0], width)).copy_(rows[:, col:col + width]).view(t.dtype)
        out.append(piece.reshape(rows.shape[0], *t.shape[1:]))
        col += width
    return out


def exchange_rows(group: dist.ProcessGroup, tensors: Sequence[torch.Tensor], send_counts: list[int],
                  recv_counts: list[int]) -> list[torch.Tensor]:
    """Sends ``send_counts[r]`` consecutive rows of every tensor to rank r; returns what arrived."""
    send = pack_rows(tensors)
    recv = torch.empty(sum(recv_counts), send.shape[1], dtype=torch.uint8, device=send.device)
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    return unpack_rows(recv, tensors)

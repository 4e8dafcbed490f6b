"""Index tensors of the grouped layouts, built from per-expert row counts."""

from __future__ import annotations

import torch

from moekit.gemm.config import M_ALIGNMENT


def contiguous_m_indices(counts: list[int], device: torch.device | str = "cpu",
                         alignment: int = M_ALIGNMENT) -> torch.Tensor:
    """int32 [M_sum] for the contiguous layout: expert g's ``counts[g]`` rows, then -1 padding up to
    the next multiple of ``alignment``; an expert with no rows takes no rows."""
    pieces = []
    for expert, count in enumerate(counts):
        if count < 0:
            raise ValueError(f"counts: expected non-negative row counts, got {counts}")
        padded = -(-count // alignment) * alignment
        piece = torch.full((padded,), -1, dtype=torch.int32)
        piece[:count] = expert
        pieces.append(piece)
    indices = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)
    return indices.to(device)

"""Input checks run before any communication, so that bad input fails on its own rank, clearly.

Each raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, size or value) whose
message names the argument and what was expected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moekit.fp8 import FP8_DTYPE, GROUP

def _capturing() -> bool:
    # Value checks read device memory; inside CUDA-graph capture that is not allowed, and the
    # values were already checked when the same call ran eagerly before capture.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_tensor(name: str, t: object, dtype: torch.dtype, ndim: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (this rank's device), got {t.device}")
    return t


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_num_experts(num_experts: object, num_ranks: int) -> int:
    check_positive_int("num_experts", num_experts)
    if num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a multiple of the group size {num_ranks} (every rank holds "
                         f"the same number of experts), got {num_experts}")
    return num_experts


def check_topk_idx(topk_idx: object, num_experts: int, device: torch.device,
                   num_tokens: int | None = None, distinct: bool = False, values: bool = True) -> torch.Tensor:
    """int64 [N, K] expert ids, each in [-1, num_experts); with ``distinct``, no expert twice in a row.

    The value checks cost one device read together, skipped during CUDA-graph capture, and without
    ``values`` (for a caller that reads ``topk_range`` along with its own device read).
    """
    check_tensor("topk_idx", topk_idx, torch.int64, 2, device)
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx: expected {num_tokens} rows (one per token of x), got shape "
                         f"{tuple(topk_idx.shape)}")
    if topk_idx.shape[1] < 1:
        raise ValueError(f"topk_idx: expected at least one top-k slot, got shape {tuple(topk_idx.shape)}")
    if not values or topk_idx.numel() == 0 or _capturing():
        return topk_idx
    n = topk_idx.shape[0]
    found = [topk_range(topk_idx)]
    if distinct:
        ordered = topk_idx.sort(dim=1).values
        repeated = ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(dim=1)
        found.append(torch.where(repeated, torch.arange(n, device=device), n).min().view(1))
    lo, hi, *first_repeat = torch.cat(found).tolist()
    raise_for_topk_range(lo, hi, num_experts)
    if first_repeat and first_repeat[0] < n:
        row = first_repeat[0]
        raise ValueError(f"topk_idx: row {row} names an expert twice ({topk_idx[row].tolist()}); "
                         "each token picks distinct experts")
    return topk_idx


def topk_range(topk_idx: torch.Tensor) -> torch.Tensor:
    """int64 [2] on the device: the smallest and largest expert id of a non-empty ``topk_idx``."""
    return torch.stack(list(torch.aminmax(topk_idx)))


def raise_for_topk_range(lo: int, hi: int, num_experts: int) -> None:
    """Raises if expert ids from ``lo`` to ``hi`` (see ``topk_range``) leave [-1, num_experts)."""
    if lo < -1 or hi >= num_experts:
        raise ValueError(f"topk_idx: expert ids must lie in [-1, {num_experts}) (-1 = empty slot), "
                         f"got values from {lo} to {hi}")


def check_topk_weights(topk_weights: object, topk_idx: torch.Tensor, name: str = "topk_weights") -> torch.Tensor:
    check_tensor(name, topk_weights, torch.float32, 2, topk_idx.device)
    check_shape(name, topk_weights, tuple(topk_idx.shape))
    return topk_weights


class CheckedActivation(NamedTuple):
    """``x`` split into its data and (for FP8) scales."""

    data: torch.Tensor
    scales: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        return self.data.shape[0]

    @property
    def hidden(self) -> int:
        return self.data.shape[1]


def check_activation(x: object, device: torch.device, name: str = "x") -> CheckedActivation:
    """bf16 [N, H], or the FP8 pair (float8_e4m3fn [N, H], float32 scales [N, H/128], any strides)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise TypeError(f"{name}: expected a bf16 tensor or a (data, scales) pair, got a sequence of {len(x)}")
        data, scales = x
        check_tensor(f"{name}[0]", data, FP8_DTYPE, 2, device)
        if data.shape[1] % GROUP:
            raise ValueError(f"{name}[0]: hidden size must be a multiple of {GROUP} for FP8, got {data.shape[1]}")
        check_tensor(f"{name}[1]", scales, torch.float32, 2, device)
        check_shape(f"{name}[1]", scales, (data.shape[0], data.shape[1] // GROUP))
    else:
        data, scales = check_tensor(name, x, torch.bfloat16, 2, device), None
    if not data.is_contiguous():
        raise ValueError(f"{name}: expected contiguous rows, got strides {data.stride()}")
    if data.shape[1] * data.element_size() % 16:
        raise ValueError(f"{name}: row bytes must be a multiple of 16, got hidden {data.shape[1]} "
                         f"({data.shape[1] * data.element_size()} bytes)")
    return CheckedActivation(data, scales)


def check_bias(bias: object, num_tokens: int, hidden: int, device: torch.device) -> list[torch.Tensor]:
    """None, one bf16 [N, H] tensor or a pair of them."""
    if bias is None:
        return []
    items = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if len(items) > 2:
        raise ValueError(f"bias: expected one tensor or a pair, got {len(items)}")
    out = []
    for i, b in enumerate(items):
        if b is None:
            continue
        check_tensor(f"bias[{i}]", b, torch.bfloat16, 2, device)
        check_shape(f"bias[{i}]", b, (num_tokens, hidden))
        out.append(b)
    return out

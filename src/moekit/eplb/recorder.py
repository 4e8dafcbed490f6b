"""Expert load recorder: per-expert token counts summed over a sliding window of steps.

Fed by dispatch's per-expert receive counts (:meth:`ExpertLoadRecorder.record`) or by the
low-latency kernels' ever-growing ``cumulative_local_expert_recv_stats`` counters
(:meth:`ExpertLoadRecorder.record_cumulative`, which records the growth since the last call).
Counts of physical experts are folded onto their logical expert through ``expert_ids``. The
window's sum (:meth:`ExpertLoadRecorder.load`) is what :func:`rebalance_experts` takes; with
several ranks, all-reduce it first.
"""

from __future__ import annotations

import torch


class ExpertLoadRecorder:
    """Sliding-window load of ``num_experts`` logical experts in ``num_layers`` layers.

    Args:
        num_layers: L; num_experts: E.
        window: number of steps summed by :meth:`load` (the current, open step included).
        device: where the counts live (the dispatch tensors' device avoids a copy per record).
    """

    def __init__(self, num_layers: int, num_experts: int, window: int, device: torch.device | str = "cpu"):
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_layers, self.num_experts, self.window = num_layers, num_experts, window
        self._counts = torch.zeros(window, num_layers, num_experts, dtype=torch.float64, device=device)
        self._slot = 0
        self._steps = 0
        self._last: dict[int | None, torch.Tensor] = {}

    def record(self, counts: torch.Tensor, layer: int | None = None, expert_ids: torch.Tensor | None = None) -> None:
        """Adds token counts to the current step.

        Args:
            counts: [N] counts of one ``layer``, or [L, N] of every layer (``layer=None``).
            layer: the layer of a 1-D ``counts``.
            expert_ids: int64 [N] or [L, N], the logical expert of each count (e.g. ``phy2log`` for
                physical counts, or the slice of it for one rank's local experts); identity if None.
        """
        rows = self._rows(layer)
        counts = counts.to(self._counts.device, torch.float64)
        if counts.dim() == 1:
            counts = counts.unsqueeze(0)
        if counts.dim() != 2 or counts.shape[0] != rows.shape[1]:
            raise ValueError(f"counts must be [N] with layer given or [{self.num_layers}, N], got {tuple(counts.shape)}")
        if expert_ids is None:
            if counts.shape[1] != self.num_experts:
                raise ValueError(f"counts must have {self.num_experts} columns without expert_ids, got {counts.shape[1]}")
            expert_ids = torch.arange(self.num_experts, device=counts.device)
        expert_ids = expert_ids.to(counts.device, torch.int64).expand_as(counts)
        if bool(((expert_ids < 0) | (expert_ids >= self.num_experts)).any()):
            raise ValueError(f"expert_ids must lie in [0, {self.num_experts})")
        self._counts[self._slot].index_put_((rows.view(-1, 1).expand_as(counts), expert_ids), counts, accumulate=True)

    def record_cumulative(self, stats: torch.Tensor, layer: int | None = None,
                          expert_ids: torch.Tensor | None = None) -> None:
        """Adds the growth of cumulative counters ``stats`` since the previous call for the same ``layer``.

        ``stats`` and ``expert_ids`` are shaped as for :meth:`record`. The first call for a layer
        counts ``stats`` whole; a counter that went down (reset, or int32 wrap) counts its new value.
        """
        stats = stats.to(self._counts.device, torch.int64)
        last = self._last.get(layer)
        delta = stats if last is None or last.shape != stats.shape else torch.where(stats >= last, stats - last, stats)
        self._last[layer] = stats.clone()
        self.record(delta, layer, expert_ids)

    def step(self) -> None:
        """Closes the current step; the oldest step leaves the window."""
        self._slot = (self._slot + 1) % self.window
        self._counts[self._slot].zero_()
        self._steps += 1

    @property
    def steps(self) -> int:
        """Steps closed so far."""
        return self._steps

    def load(self) -> torch.Tensor:
        """float64 [L, E]: counts summed over the last ``window`` steps."""
        return self._counts.sum(0)

    def reset(self) -> None:
        """Forgets all counts and cumulative snapshots."""
        self._counts.zero_()
        self._last.clear()
        self._slot = self._steps = 0

    def _rows(self, layer: int | None) -> torch.Tensor:
        if layer is None:
            return torch.arange(self.num_layers, device=self._counts.device).view(1, -1)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return torch.tensor([[layer]], device=self._counts.device)

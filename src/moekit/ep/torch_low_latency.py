"""The ``torch`` backend of low-latency dispatch / combine (decoding): the definition of correct.

Fixed shapes, no host synchronisation on the data path: every rank sends every peer T token slots
(rows past its N tokens, and slots whose experts live elsewhere, carry -1 expert ids), so each
exchange is an ``all_to_all_single`` with equal splits. The receiver unpacks into the per-expert
slabs with sorts and scatters on the device.

Receive order, which the fast backends reproduce: within local expert e's slab, the rows are ordered
by (source rank, source token index, top-k slot); ``layout_range[e, s]`` is that source's block.
Combine sums each token's weighted rows in float32 in top-k slot order: ``acc = acc + w_k * row_k``;
with ``rank_order`` (what the triton backend's call without the hook computes, summing on the
experts' side first) it sums per expert rank in slot order, then those sums in rank order.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from moekit.ep.agreement import check_agreement
from moekit.ep.results import LowLatencyHandle, empty_low_latency_outputs
from moekit.ep.rows import pack_rows, unpack_rows
from moekit.fp8 import pack_ue8m0, per_token_cast_to_fp8


class TorchLowLatency:
    """Low-latency dispatch / combine over ``group`` with collectives only."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.device = device
        self._combine_buffers: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        self._parity = 0

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_tokens: int, num_experts: int, *,
                 use_fp8: bool, round_scale: bool, use_ue8m0: bool,
                 cumulative_local_expert_recv_stats: torch.Tensor | None,
                 defer_receive: bool):
        """Returns (recv_x, recv_count, handle, receive) where ``receive()`` completes the outputs."""
        r, t_max, k = self.num_ranks, num_max_tokens, topk_idx.shape[1]
        n, hidden = x.shape
        e_loc = num_experts // r
        check_agreement(self.group, "low_latency_dispatch",
                        {"num_max_dispatch_tokens_per_rank": t_max, "hidden": hidden, "num_experts": num_experts,
                         "num_topk": k, "use_fp8": int(use_fp8), "use_ue8m0": int(use_ue8m0)}, self.device)
        if use_fp8:
            data, scales = per_token_cast_to_fp8(x, round_scale)
            payload = [data, scales]
        else:
            payload = [x]
        # Slot t of peer p: token t's row and its expert ids, -1 where the expert is not on p.
        slots = [torch.zeros((t_max, *p.shape[1:]), dtype=p.dtype, device=self.device) for p in payload]
        for slot, p in zip(slots, payload):
            slot[:n] = p
        ids = torch.full((t_max, k), -1, dtype=torch.int64, device=self.device)
        ids[:n] = topk_idx
        owner = torch.where(ids >= 0, ids // e_loc, -1)
        peers = torch.arange(r, device=self.device).view(r, 1, 1)
        per_peer_ids = torch.where(owner.unsqueeze(0) == peers, ids.unsqueeze(0), -1)  # [R, T, K]
        send = pack_rows([s.unsqueeze(0).expand(r, *s.shape).reshape(r * t_max, *s.shape[1:]) for s in slots]
                         + [per_peer_ids.reshape(r * t_max, k)])
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)

        rows = r * t_max
        recv_data, recv_scales, recv_count, handle = empty_low_latency_outputs(
            r, t_max, hidden, num_experts, k, use_fp8, use_ue8m0, self.device)
        src_info, layout_range, src_rank, src_slot = handle.src_info, handle.layout_range, handle.src_rank, handle.src_slot
        token_rows = handle.token_rows

        def receive() -> None:
            work.wait()
            parts = unpack_rows(recv, slots + [per_peer_ids.reshape(r * t_max, k)])
            got_ids = parts[-1]  # [R*T, K] global ids, rows ordered (source, token)
            local = got_ids - self.rank * e_loc
            valid = (got_ids >= 0) & (local >= 0) & (local < e_loc)
            key = torch.where(valid, local, e_loc).flatten()  # pair f = (s*T + t)*K + k
            order = torch.argsort(key, stable=True)
            counts = torch.zeros(e_loc + 1, dtype=torch.int64, device=self.device)
            counts.index_add_(0, key, torch.ones_like(key))
            begin = torch.cumsum(counts, 0) - counts
            sorted_key = key[order]
            pos = torch.arange(order.numel(), device=self.device) - begin[sorted_key]
            src_row = order // k
            # Pairs that are not for this rank land in one spare row past the slabs.
            target = torch.where(sorted_key < e_loc, sorted_key * rows + pos, e_loc * rows)

            def scatter(values: torch.Tensor, out: torch.Tensor, fill: float) -> None:
                flat = values.new_zeros((e_loc * rows + 1, *values.shape[1:]))
                if fill:
                    flat.fill_(fill)
                flat[target] = values
                out.copy_(flat[:-1].view(out.shape))

            scatter(parts[0][src_row], recv_data, 0)
            if use_fp8:
                got_scales = parts[1][src_row]
                if use_ue8m0:
                    got_scales = pack_ue8m0(got_scales)
                scatter(got_scales, recv_scales, 0)
            scatter((src_row % t_max).to(torch.int32), src_info, -1)
            scatter(src_row // t_max, src_rank, -1)
            scatter(order % k, src_slot, -1)
            here = sorted_key < e_loc
            token_rows.view(-1)[order[here]] = target[here].to(torch.int32)
            recv_count.copy_(counts[:e_loc])
            # Blocks per (expert, source rank): sizes, then exclusive prefix over sources.
            block = torch.where(valid, local * r + torch.arange(r, device=self.device).repeat_interleave(t_max)
                                .unsqueeze(1), e_loc * r).flatten()
            sizes = torch.zeros(e_loc * r + 1, dtype=torch.int64, device=self.device)
            sizes.index_add_(0, block, torch.ones_like(block))
            sizes = sizes[:-1].view(e_loc, r)
            starts = torch.cumsum(sizes, 1) - sizes
            layout_range.copy_((starts << 32) | sizes)
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)

        if not defer_receive:
            receive()
        recv_x = (recv_data, recv_scales) if use_fp8 else recv_data
        return recv_x, recv_count, handle, receive

    # ------------------------------------------------------------------- combine
    def combine_buffer(self, num_max_tokens: int, hidden: int, num_experts: int) -> torch.Tensor:
        """The bf16 [E_loc, R*T, H] buffer that the next zero-copy combine reads."""
        key = (num_max_tokens, hidden, num_experts)
        if key not in self._combine_buffers:
            shape = (num_experts // self.num_ranks, self.num_ranks * num_max_tokens, hidden)
            self._combine_buffers[key] = [torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
                                          for _ in range(2)]
        return self._combine_buffers[key][self._parity]

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                handle: LowLatencyHandle, *, zero_copy: bool, out: torch.Tensor | None,
                defer_receive: bool, rank_order: bool = False) -> tuple[torch.Tensor, Callable[[], None]]:
        _, _, t_max, hidden, num_experts = handle
        r, k = self.num_ranks, handle.num_topk
        e_loc = num_experts // r
        source = self.combine_buffer(t_max, hidden, num_experts) if zero_copy else x
        self._parity ^= 1
        # Each received row goes back to slot (token, top-k slot) of its source rank.
        valid = handle.src_rank >= 0
        dest = torch.where(valid, (handle.src_rank * t_max + handle.src_info.to(torch.int64)) * k + handle.src_slot,
                           r * t_max * k)
        send = torch.zeros((r * t_max * k + 1, hidden), dtype=torch.bfloat16, device=self.device)
        send[dest.flatten()] = source.reshape(-1, hidden)
        send = send[:-1]
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
        n = topk_idx.shape[0]
        result = out if out is not None else torch.empty((n, hidden), dtype=torch.bfloat16, device=self.device)

        def receive() -> None:
            work.wait()
            back = recv.view(r, t_max, k, hidden)
            token = torch.arange(n, device=self.device)
            owner = torch.where(topk_idx >= 0, topk_idx // e_loc, -1)
            acc = torch.zeros((n, hidden), dtype=torch.float32, device=self.device)
            for group in (range(r) if rank_order else [None]):  # None: every rank at once
                part = torch.zeros_like(acc)
                for slot in range(k):
                    ok = (owner[:, slot] >= 0 if group is None else owner[:, slot] == group).unsqueeze(1)
                    rows = back[owner[:, slot].clamp(min=0), token, slot].float()
                    part = part + torch.where(ok, topk_weights[:, slot:slot + 1] * rows, 0.0)
                acc = acc + part
            result.copy_(acc.to(torch.bfloat16))

        if not defer_receive:
            receive()
        return result, receive

    def clean(self) -> None:
        for buffers in self._combine_buffers.values():
            for b in buffers:
                b.zero_()
        self._parity = 0

"""An expert-parallel MoE layer (router, SwiGLU experts) built on ``moekit.ep.Buffer``, and the same
layer computed in one process, which it is checked against.

Each token picks ``top_k`` experts by a linear router with softmax weights (renormalised over the
chosen k). Expert e computes ``down_e(silu(gate_e(x)) * up_e(x))``; the token's output is the
weighted sum of its experts' outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ep import Buffer


@dataclass
class MoEConfig:
    """Sizes of the layer. ``num_experts`` must be a multiple of the expert-parallel group size."""

    hidden: int = 256
    ffn_hidden: int = 128
    num_experts: int = 16
    top_k: int = 4
    seed: int = 0


class Router(nn.Module):
    """Linear scores, softmax, top-k; weights renormalised to sum to 1 over the chosen experts."""

    def __init__(self, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (topk_idx int64 [N, K], topk_weights float32 [N, K])."""
        probs = torch.softmax(self.proj(x.float()), dim=-1)
        weights, idx = probs.topk(self.top_k, dim=-1)
        return idx, weights / weights.sum(dim=-1, keepdim=True)


class SwiGLUExperts(nn.Module):
    """A stack of SwiGLU experts: gate/up [G, 2F, H], down [G, H, F] (float32 master weights)."""

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(num_experts, 2 * ffn_hidden, hidden) * hidden ** -0.5)
        self.down = nn.Parameter(torch.randn(num_experts, hidden, ffn_hidden) * ffn_hidden ** -0.5)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows x [M, H] (any float dtype) -> float32 [M, H]."""
        gate, up = (x.float() @ self.gate_up[e].t()).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.down[e].t()


def build_full_layer(config: MoEConfig, device: torch.device) -> tuple[Router, SwiGLUExperts]:
    """The whole layer, identical on every rank (same seed)."""
    torch.manual_seed(config.seed)
    router = Router(config.hidden, config.num_experts, config.top_k).to(device)
    experts = SwiGLUExperts(config.num_experts, config.hidden, config.ffn_hidden).to(device)
    return router, experts


@torch.no_grad()
def moe_reference(x: torch.Tensor, router: Router, experts: SwiGLUExperts) -> torch.Tensor:
    """The layer in one process: bf16 [N, H] -> bf16 [N, H], float32 inside."""
    idx, weights = router(x)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(experts.gate_up.shape[0]):
        token, slot = (idx == e).nonzero(as_tuple=True)
        if token.numel():
            out.index_add_(0, token, weights[token, slot, None] * experts.expert(e, x[token]))
    return out.to(torch.bfloat16)


class ExpertParallelMoE(nn.Module):
    """The layer with its experts split over the ranks of ``buffer``'s group.

    Rank r holds experts [r * E_loc, (r + 1) * E_loc). ``forward`` routes locally, dispatches each
    token to the ranks of its experts, runs the local experts on what arrived (weighting each
    output by the token's router weight), and combines the partial sums back.

    Args:
        buffer: the expert-parallel communication buffer.
        router: replicated router.
        experts: SwiGLU weights of this rank's E_loc experts.
        mode: ``"normal"`` (dispatch / combine) or ``"low-latency"`` (fixed-shape decoding calls).
        max_tokens: T for low-latency mode: the most tokens any rank passes to one forward.
    """

    def __init__(self, buffer: Buffer, router: Router, experts: SwiGLUExperts, num_experts: int,
                 mode: str = "normal", max_tokens: int = 0) -> None:
        super().__init__()
        if mode not in ("normal", "low-latency"):
            raise ValueError(f"mode: expected 'normal' or 'low-latency', got {mode!r}")
        if mode == "low-latency" and max_tokens < 1:
            raise ValueError("max_tokens: low-latency mode needs the largest token count per rank (>= 1)")
        self.buffer, self.router, self.experts = buffer, router, experts
        self.num_experts, self.mode, self.max_tokens = num_experts, mode, max_tokens
        self.num_local = num_experts // buffer.group_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x bf16 [N, H] -> bf16 [N, H]."""
        idx, weights = self.router(x)
        if self.mode == "low-latency":
            return self._forward_low_latency(x, idx, weights)
        layout = self.buffer.get_dispatch_layout(idx, self.num_experts)
        recv = self.buffer.dispatch(x, topk_idx=idx, topk_weights=weights,
                                    num_tokens_per_rank=layout.num_tokens_per_rank,
                                    is_token_in_rank=layout.is_token_in_rank,
                                    num_tokens_per_expert=layout.num_tokens_per_expert)
        out = torch.zeros(recv.recv_x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.num_local):
            row, slot = (recv.recv_topk_idx == e).nonzero(as_tuple=True)
            if row.numel():
                out.index_add_(0, row, recv.recv_topk_weights[row, slot, None] * self.experts.expert(e, recv.recv_x[row]))
        return self.buffer.combine(out.to(torch.bfloat16), recv.handle).combined_x

    def _forward_low_latency(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        recv = self.buffer.low_latency_dispatch(x, idx, self.max_tokens, self.num_experts, use_fp8=False)
        recv_x = recv.recv_x
        out = torch.zeros_like(recv_x)
        for e, count in enumerate(recv.recv_count.tolist()):
            out[e, :count] = self.experts.expert(e, recv_x[e, :count]).to(torch.bfloat16)
        return self.buffer.low_latency_combine(out, idx, weights, recv.handle).combined_x

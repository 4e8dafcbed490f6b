"""Performance settings of the high-throughput kernels and the buffer sizes they need."""

from __future__ import annotations

from dataclasses import dataclass

# Ranks that share one NVLink domain (a host); larger groups span several and report per-domain counts.
NUM_MAX_NVL_PEERS = 8
# Bits of a low-latency call's top-k (the triton backend packs it into a word): top-k < 64.
LOW_LATENCY_TOPK_BITS = 6
_ALIGN = 128


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class Config:
    """Tuning knobs of dispatch / combine, in DeepEP's order so that positional construction works.

    Args:
        num_sms: SMs the high-throughput kernels may occupy (even; a channel is a pair of SMs).
        num_max_nvl_chunked_send_tokens: tokens a channel sends per step over NVLink.
        num_max_nvl_chunked_recv_tokens: tokens of receive space per channel and peer in the NVLink buffer.
        num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens: the same across hosts;
            accepted for compatibility, unused by moekit's single-host kernels.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                     "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name}: expected a positive int, got {value!r}")
        if self.num_sms % 2:
            raise ValueError(f"Config.num_sms: expected an even number (SMs work in pairs), got {self.num_sms}")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer for rows of ``hidden_bytes`` among ``num_ranks`` ranks of a host.

        Each channel keeps, for each peer, ``num_max_nvl_chunked_recv_tokens`` rows plus their
        metadata (top-k slots, scales, index), and a small block of counters per pair of ranks.
        This is DeepEP's sizing, kept so that code written for it runs unchanged. moekit's triton
        backend uses the buffer as one region for all rows a rank receives: a call that needs more
        runs in rounds, and its first such dispatch or combine warns with the bytes that would hold
        one round (about ``num_ranks * tokens * (hidden_bytes + 256)``).
        """
        peers = min(num_ranks, NUM_MAX_NVL_PEERS)
        channels = self.num_sms // 2
        row_bytes = hidden_bytes + 256  # room for top-k ids / weights, FP8 scales and the source index
        counters = channels * peers * (2 * peers + 4) * 4
        return _align(counters + channels * peers * self.num_max_nvl_chunked_recv_tokens * row_bytes)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of cross-host buffer; 0 while every rank is on one host."""
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        nodes = (num_ranks + NUM_MAX_NVL_PEERS - 1) // NUM_MAX_NVL_PEERS
        channels = self.num_sms // 2
        return _align(channels * nodes * self.num_max_rdma_chunked_recv_tokens * (hidden_bytes + 256) * 2)


# Recommended settings per group size (DeepEP's published table; the SM count is filled in per call).
_DISPATCH = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
             24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
             96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
_COMBINE = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
            24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
            96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def recommended_config(num_ranks: int, num_sms: int, for_combine: bool) -> Config:
    """The tuned setting for ``num_ranks``; the nearest larger tabulated group size otherwise."""
    table = _COMBINE if for_combine else _DISPATCH
    if num_ranks < 1:
        raise ValueError(f"num_ranks: expected >= 1, got {num_ranks}")
    key = min((k for k in table if k >= num_ranks), default=max(table))
    return Config(num_sms, *table[key])


def low_latency_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                          num_experts: int) -> int:
    """Bytes of low-latency buffer: two alternating sets of send and receive areas.

    A dispatch message is a row of bf16 (or FP8 plus scales) with a 16-byte header; the receive
    area holds every expert's [num_ranks * T] slab; combine sends bf16 rows back the same way.
    """
    t = num_max_dispatch_tokens_per_rank
    dispatch_msg = 16 + max(hidden * 2, hidden + hidden // 128 * 4)
    combine_msg = hidden * 2
    send = max(t * dispatch_msg, num_experts * t * combine_msg)
    recv = max(num_experts * t * dispatch_msg, num_experts * t * combine_msg)
    signals = 8 * (num_ranks + 2 * num_experts)  # params, flags and row counts
    weights = 8 * num_ranks * t * (1 << LOW_LATENCY_TOPK_BITS)  # the summing combine's tagged weights
    return _align(2 * (_align(send) + _align(recv) + _align(signals) + _align(weights)))

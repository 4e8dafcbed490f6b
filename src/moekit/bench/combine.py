"""``python -m moekit bench combine``: high-throughput combine (bf16) on the GPUs of one host against NCCL.

The rows a dispatch delivered go back and are summed per token; NCCL ``all_to_all_single`` moves the
same rows back (no reduction counted against it), and so does torch's ``all_to_all_vdev_2d`` (where it
runs); moekit's torch backend does the same combine. Timed as ``bench dispatch`` times calls.
"""

from __future__ import annotations

import torch.distributed as dist

from moekit.bench._nvlink import ep_setup, nccl_all_to_all_us, peer_copy_bandwidth_gbps, sweep_main
from moekit.bench.dispatch import COLUMNS
from moekit.bench.timing import back_to_back_us, graph_us, median_us
from moekit.ep.torch_backend import count_matrix_from_prefix


def measure(num_tokens: int, hidden: int, topk: int, num_experts: int, num_sms: int) -> list[dict]:
    """On each rank: combine timings for ``num_tokens`` tokens."""
    rank = dist.get_rank()
    x, fast, ref, args = ep_setup(num_tokens, hidden, topk, num_experts, num_sms)
    d = fast.dispatch(x, **args)
    d_ref = ref.dispatch(x, **args)
    peer_gbps = peer_copy_bandwidth_gbps(256 << 20)
    us = back_to_back_us(lambda: fast.combine(d.recv_x, d.handle), before=dist.barrier)
    us_alone = median_us(lambda: fast.combine(d.recv_x, d.handle), setup=dist.barrier)
    us_graph = graph_us(lambda: fast.combine(d.recv_x, d.handle), before=dist.barrier)
    torch_us = median_us(lambda: ref.combine(d_ref.recv_x, d_ref.handle), warmup=2, repeat=5, setup=dist.barrier)
    counts = count_matrix_from_prefix(d.handle.rank_prefix_matrix)
    back, home = counts[:, rank].tolist(), counts[rank].tolist()
    row_bytes = hidden * 2
    nccl_us = nccl_all_to_all_us(back, home, row_bytes)
    remote = sum(back) - back[rank]
    return [dict(tokens=num_tokens, format="bf16", us_cached=us, us=us, us_alone=us_alone, us_graph=us_graph,
                 gbps_deepep=sum(back) * row_bytes / us / 1e3, gbps_nvlink=remote * row_bytes / us / 1e3,
                 nccl_us=nccl_us, vs_nccl=nccl_us / us, torch_us=torch_us,
                 peer_fraction=remote * row_bytes / us / 1e3 / peer_gbps, sms=num_sms,
                 peer_gbps=peer_gbps)]


def main(argv: list[str]) -> int:
    columns = {k: v for k, v in COLUMNS.items() if k not in ("us_cached", "format")}
    return sweep_main(argv, "combine", __doc__, "combine bf16", columns, measure, ["us", "nccl_us", "vdev_us"])

"""``python -m moekit bench dispatch``: high-throughput dispatch on the GPUs of one host against NCCL.

Times moekit's triton backend (with the handle reused, as DeepEP's test times it, and without),
NCCL ``all_to_all_single`` moving the same remote bytes (rows already grouped by destination),
torch's ``all_to_all_vdev_2d`` moving the same rows (where it runs) and moekit's torch backend, for
bf16 and FP8 rows; reports GB/s as DeepEP counts them (every received byte) and as bytes that
crossed NVLink, against the copy engine's peer bandwidth in the same run.

Calls are timed back to back, each between two CUDA events, as DeepEP's tests time them (NCCL and
``all_to_all_vdev_2d`` alike), so the host prepares a call while the device runs the one before;
"alone" is the cached call issued by itself after a barrier, which adds the host's own time to it;
"graph" is the cached call replayed from a CUDA graph: the device's time alone.
"""

from __future__ import annotations

import torch.distributed as dist

from moekit.bench._nvlink import ep_setup, nccl_all_to_all_us, peer_copy_bandwidth_gbps, row_bytes, sweep_main
from moekit.bench.timing import back_to_back_us, graph_us, median_us
from moekit.ep.torch_backend import count_matrix_from_prefix

COLUMNS = {"tokens": "tokens/rank", "format": "format", "us_cached": "moekit us (handle)", "us": "moekit us",
           "us_alone": "alone us", "us_graph": "graph us",
           "gbps_deepep": "GB/s DeepEP", "gbps_nvlink": "GB/s NVLink", "nccl_us": "NCCL us",
           "vs_nccl": "x NCCL", "vdev_us": "vdev_2d us", "vs_vdev": "x vdev_2d", "torch_us": "torch-backend us",
           "peer_fraction": "of peer BW", "sms": "SMs"}


def measure(num_tokens: int, hidden: int, topk: int, num_experts: int, num_sms: int) -> list[dict]:
    """On each rank: dispatch timings for bf16 and FP8 rows of ``num_tokens`` tokens."""
    from moekit.fp8 import per_token_cast_to_fp8

    rank = dist.get_rank()
    x, fast, ref, args = ep_setup(num_tokens, hidden, topk, num_experts, num_sms)
    peer_gbps = peer_copy_bandwidth_gbps(256 << 20)
    rows = []
    for fmt in ("bf16", "fp8"):
        data = x if fmt == "bf16" else per_token_cast_to_fp8(x)
        d = fast.dispatch(data, **args)
        us_cached = back_to_back_us(lambda: fast.dispatch(data, handle=d.handle), before=dist.barrier)
        us = back_to_back_us(lambda: fast.dispatch(data, **args), before=dist.barrier)
        us_alone = median_us(lambda: fast.dispatch(data, handle=d.handle), setup=dist.barrier)
        us_graph = graph_us(lambda: fast.dispatch(data, handle=d.handle), before=dist.barrier)
        torch_us = median_us(lambda: ref.dispatch(data, **args), warmup=2, repeat=5, setup=dist.barrier)
        width = row_bytes(fmt, hidden)
        counts = count_matrix_from_prefix(d.handle.rank_prefix_matrix)
        send, recv = counts[rank].tolist(), counts[:, rank].tolist()
        nccl_us = nccl_all_to_all_us(send, recv, width)
        remote = sum(recv) - recv[rank]
        rows.append(dict(tokens=num_tokens, format=fmt, us_cached=us_cached, us=us, us_alone=us_alone,
                         us_graph=us_graph, gbps_deepep=sum(recv) * width / us_cached / 1e3,
                         gbps_nvlink=remote * width / us_cached / 1e3, nccl_us=nccl_us,
                         vs_nccl=nccl_us / us_cached, torch_us=torch_us,
                         peer_fraction=remote * width / us_cached / 1e3 / peer_gbps, sms=num_sms,
                         peer_gbps=peer_gbps))
    return rows


def main(argv: list[str]) -> int:
    return sweep_main(argv, "dispatch", __doc__, "dispatch", COLUMNS, measure, ["us_cached", "nccl_us", "vdev_us"],
                      group="format", formats=("bf16", "fp8"))

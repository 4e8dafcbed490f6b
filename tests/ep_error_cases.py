"""Rank-side checks that bad input raises a clear error, before any communication."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ep_cases import device, make_buffer
from ep_inputs import Scenario, all_inputs
from moekit.ep import Buffer, Config


def _raises(exc: type, match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def check_bad_inputs(backend: str) -> None:
    sc = Scenario(tokens=[4, 4], hidden=256, num_experts=8, topk=2)
    me, dev = dist.get_rank(), device()
    mine = all_inputs(sc, dev)[me]
    buf = make_buffer(backend, sc, low_latency_max_tokens=8)
    idx, x, w = mine.topk_idx, mine.x, mine.topk_weights

    # get_dispatch_layout
    _raises(TypeError, "topk_idx: expected dtype torch.int64", buf.get_dispatch_layout, idx.int(), 8)
    _raises(ValueError, r"topk_idx: expert ids must lie in \[-1, 8\)", buf.get_dispatch_layout, idx + 8, 8)
    _raises(ValueError, r"topk_idx: expert ids must lie", buf.get_dispatch_layout, idx.clamp(max=-2), 8)
    _raises(ValueError, "num_experts: expected a multiple of the group size", buf.get_dispatch_layout, idx, 7)
    _raises(ValueError, "topk_idx: expected 2 dimensions", buf.get_dispatch_layout, idx[:, 0], 8)

    # dispatch
    lay = buf.get_dispatch_layout(idx, 8)
    kw = dict(num_tokens_per_rank=lay.num_tokens_per_rank, is_token_in_rank=lay.is_token_in_rank,
              num_tokens_per_expert=lay.num_tokens_per_expert, topk_idx=idx, topk_weights=w)
    _raises(TypeError, "x: expected dtype torch.bfloat16", buf.dispatch, x.float(), **kw)
    _raises(ValueError, "x: expected 2 dimensions", buf.dispatch, x[None], **kw)
    data = torch.zeros(4, 200, dtype=torch.float8_e4m3fn, device=dev)
    _raises(ValueError, r"x\[0\]: hidden size must be a multiple of 128", buf.dispatch,
            (data, torch.ones(4, 1, device=dev)), **kw)
    data = torch.zeros(4, 256, dtype=torch.float8_e4m3fn, device=dev)
    _raises(ValueError, r"x\[1\]: expected shape \(4, 2\)", buf.dispatch, (data, torch.ones(4, 3, device=dev)), **kw)
    _raises(ValueError, "row bytes must be a multiple of 16", buf.dispatch, torch.zeros(4, 12, dtype=torch.bfloat16,
                                                                                       device=dev), **kw)
    _raises(ValueError, "num_tokens_per_rank: required", buf.dispatch, x, **{**kw, "num_tokens_per_rank": None})
    _raises(ValueError, r"is_token_in_rank: expected shape \(4, 2\)", buf.dispatch, x,
            **{**kw, "is_token_in_rank": lay.is_token_in_rank[:3]})
    _raises(ValueError, r"topk_weights: expected shape \(4, 2\)", buf.dispatch, x, **{**kw, "topk_weights": w[:, :1]})
    _raises(ValueError, "topk_idx: expected 4 rows", buf.dispatch, x, **{**kw, "topk_idx": idx[:3],
                                                                         "topk_weights": None})
    _raises(ValueError, "expert_alignment: expected an int >= 1", buf.dispatch, x, expert_alignment=0, **kw)
    _raises(ValueError, "num_worst_tokens: expected an int >= 0", buf.dispatch, x, num_worst_tokens=-1, **kw)
    _raises(TypeError, "config: expected moekit.ep.Config", buf.dispatch, x, config={"num_sms": 20}, **kw)
    # every rank passes the bad ids (the triton engine finds them in its count-exchange read)
    _raises(ValueError, r"topk_idx: expert ids must lie in \[-1, 8\)", buf.dispatch, x, **{**kw, "topk_idx": idx + 8})
    _raises(ValueError, r"num_tokens_per_rank: does not match is_token_in_rank.sum\(0\) on rank", buf.dispatch, x,
            **{**kw, "num_tokens_per_rank": lay.num_tokens_per_rank + 1})
    res = buf.dispatch(x, **kw)
    _raises(ValueError, "must be None for a cached dispatch", buf.dispatch, x, handle=res.handle, topk_idx=idx)
    _raises(ValueError, "the handle was made for 4 tokens", buf.dispatch, x[:2], handle=res.handle)
    _raises(TypeError, "handle: expected the handle a dispatch returned", buf.dispatch, x, handle=(1, 2, 3))

    # combine
    _raises(ValueError, "x: expected .* rows", buf.combine, res.recv_x[:-1] if len(res.recv_x) else
            torch.zeros(1, 256, dtype=torch.bfloat16, device=dev), res.handle)
    _raises(ValueError, r"bias\[0\]: expected shape \(4, 256\)", buf.combine, res.recv_x, res.handle, bias=x[:2])
    _raises(ValueError, "bias: expected one tensor or a pair", buf.combine, res.recv_x, res.handle, bias=(x, x, x))
    _raises(TypeError, "handle: expected the handle a dispatch returned", buf.combine, res.recv_x, "handle")

    # low-latency dispatch
    _raises(ValueError, "x: 4 tokens exceed num_max_dispatch_tokens_per_rank=3", buf.low_latency_dispatch, x, idx, 3, 8)
    _raises(ValueError, "hidden size must be a multiple of 512", buf.low_latency_dispatch, x, idx, 8, 8,
            round_scale=True, use_ue8m0=True)
    _raises(ValueError, "use_ue8m0: needs round_scale=True", buf.low_latency_dispatch, x, idx, 8, 8, use_ue8m0=True)
    _raises(ValueError, "async_finish and return_recv_hook cannot be combined", buf.low_latency_dispatch, x, idx, 8, 8,
            async_finish=True, return_recv_hook=True)
    repeated = idx.clone()
    repeated[0] = torch.tensor([3, 3])
    _raises(ValueError, "names an expert twice", buf.low_latency_dispatch, x, repeated, 8, 8)
    _raises(TypeError, "cumulative_local_expert_recv_stats: expected dtype torch.int32", buf.low_latency_dispatch, x,
            idx, 8, 8, cumulative_local_expert_recv_stats=torch.zeros(4, dtype=torch.int64, device=dev))
    _raises(ValueError, r"dispatch_wait_recv_cost_stats: expected shape \(2,\)", buf.low_latency_dispatch, x, idx, 8, 8,
            dispatch_wait_recv_cost_stats=torch.zeros(3, dtype=torch.int64, device=dev))
    _raises(ValueError, "num_rdma_bytes: .* is too small", buf.low_latency_dispatch, x, idx, 64, 8)
    normal_only = make_buffer(backend, sc)
    _raises(ValueError, "low_latency_mode=True", normal_only.low_latency_dispatch, x, idx, 8, 8)

    # low-latency combine
    ll = buf.low_latency_dispatch(x, idx, 8, 8, use_fp8=False)
    y = torch.zeros(4, 16, 256, dtype=torch.bfloat16, device=dev)
    _raises(ValueError, r"x: expected shape \(4, 16, 256\)", buf.low_latency_combine, y[:, :8], idx, w, ll.handle)
    _raises(ValueError, "topk_idx: expected 2 slots as in the dispatch", buf.low_latency_combine, y,
            idx[:, :1], w[:, :1], ll.handle)
    _raises(ValueError, r"out: expected shape \(4, 256\)", buf.low_latency_combine, y, idx, w, ll.handle, out=x[:1])
    _raises(TypeError, "handle: expected the handle low_latency_dispatch returned", buf.low_latency_combine, y, idx, w,
            tuple(ll.handle))

    # settings
    _raises(ValueError, "new_num_sms: expected an even number", Buffer.set_num_sms, 3)
    _raises(ValueError, "Config.num_sms: expected an even number", Config, 3)
    _raises(RuntimeError, "explicitly_destroy=False", buf.destroy)
    doomed = make_buffer(backend, sc, explicitly_destroy=True)
    doomed.destroy()
    _raises(RuntimeError, "was destroyed", doomed.get_dispatch_layout, idx, 8)
    _raises(ValueError, "backend: expected 'auto' or one of", Buffer, None, backend="nccl-magic")
    _raises(ValueError, "comm: MPI communicators are not supported", Buffer, None, comm=object())


def check_ranks_disagree(backend: str) -> None:
    """Ranks passing different T or hidden sizes get an error on every rank, not a hang."""
    sc = Scenario(tokens=[2, 2], hidden=256, num_experts=8, topk=2)
    me, dev = dist.get_rank(), device()
    mine = all_inputs(sc, dev)[me]
    buf = make_buffer(backend, sc, low_latency_max_tokens=16)
    # The torch backend names the argument; the triton one, checking on the device, names the ranks.
    with pytest.raises(ValueError, match="disagree"):
        buf.low_latency_dispatch(mine.x, mine.topk_idx, 8 if me == 0 else 16, 8, use_fp8=False)
    buf.clean_low_latency_buffer(16, sc.hidden, 8)
    with pytest.raises(ValueError, match="disagree"):
        buf.low_latency_dispatch(mine.x[:, :128 * (me + 1)].contiguous(), mine.topk_idx, 8, 8, use_fp8=False)
    buf.clean_low_latency_buffer(16, sc.hidden, 8)
    with pytest.raises(ValueError, match="Buffer: ranks disagree on num_nvl_bytes"):
        Buffer(None, num_nvl_bytes=1024 * (me + 1), backend=backend)

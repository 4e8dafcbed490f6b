"""Rank-side checks of dispatch / combine, run on every rank of a cluster by the tests.

Each function builds a Buffer with the backend under test, runs the calls, and asserts exact
results against ``ep_inputs``' expectations. They run unchanged on CPU ranks (gloo) and on GPUs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ep_inputs import (Scenario, all_inputs, all_reduce_sum, count_matrix, expected_low_latency, expected_receive,
                       fp8_pair, local_ids)
from moekit.ep import Buffer
from moekit.fp8 import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8


def device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_buffer(backend: str, sc: Scenario | None = None, low_latency_max_tokens: int = 0, **kwargs) -> Buffer:
    rdma = 0
    if low_latency_max_tokens:
        rdma = Buffer.get_low_latency_rdma_size_hint(low_latency_max_tokens, sc.hidden, sc.world, sc.num_experts)
    return Buffer(None, num_nvl_bytes=kwargs.pop("num_nvl_bytes", 1 << 22), num_rdma_bytes=rdma,
                  low_latency_mode=bool(low_latency_max_tokens), backend=backend, **kwargs)


def check_dispatch_combine(backend: str, sc: Scenario, expert_alignment: int = 1) -> dict:
    """Layout, dispatch (bf16, FP8, cached, num_worst_tokens) and combine on rank-coded inputs."""
    me, dev = dist.get_rank(), device()
    inputs = all_inputs(sc, dev)
    mine = inputs[me]
    buf = make_buffer(backend)
    e_loc = sc.experts_per_rank

    # Layout, against loops over this rank's own routing.
    layout = buf.get_dispatch_layout(mine.topk_idx, sc.num_experts)
    counts = count_matrix(sc, inputs)
    assert layout.num_tokens_per_rank.cpu().tolist() == counts[me].tolist()
    assert layout.num_tokens_per_rdma_rank is None
    per_expert = [sum(row.count(e) for row in mine.topk_idx.tolist()) for e in range(sc.num_experts)]
    assert layout.num_tokens_per_expert.cpu().tolist() == per_expert
    for t, row in enumerate(mine.topk_idx.tolist()):
        ranks = {e // e_loc for e in row if e >= 0}
        assert layout.is_token_in_rank[t].cpu().tolist() == [r in ranks for r in range(sc.world)]

    # Dispatch with top-k and weights.
    res = buf.dispatch(mine.x, num_tokens_per_rank=layout.num_tokens_per_rank,
                       is_token_in_rank=layout.is_token_in_rank, num_tokens_per_expert=layout.num_tokens_per_expert,
                       topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, expert_alignment=expert_alignment)
    rows = expected_receive(sc, inputs, me)
    assert res.recv_x.shape == (len(rows), sc.hidden)
    assert torch.equal(res.handle.rank_prefix_matrix.cpu(), counts.cumsum(0).to(torch.int32))
    for i, (s, t) in enumerate(rows):
        assert torch.equal(res.recv_x[i], inputs[s].x[t]), f"row {i} should be token {t} of rank {s}"
        assert res.recv_topk_idx[i].tolist() == local_ids(inputs[s].topk_idx[t].tolist(), me, sc)
        want_w = torch.where(res.recv_topk_idx[i] >= 0, inputs[s].topk_weights[t], 0.0)
        assert torch.equal(res.recv_topk_weights[i], want_w)
        assert int(res.handle.recv_src_idx[i]) == t
    got_experts = [sum(r.count(e) for s_t in rows for r in [local_ids(inputs[s_t[0]].topk_idx[s_t[1]].tolist(), me, sc)])
                   for e in range(e_loc)]
    aligned = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in got_experts]
    assert res.num_recv_tokens_per_expert_list == aligned
    # The same counts, from every rank's layout summed.
    total = all_reduce_sum(layout.num_tokens_per_expert)[me * e_loc:(me + 1) * e_loc].cpu().tolist()
    assert [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in total] == aligned

    # Combine: every copy back, summed, plus two biases; weights summed too.
    g = torch.Generator().manual_seed(99 + me)
    bias0 = torch.randn(sc.tokens[me], sc.hidden, generator=g).bfloat16().to(dev)
    bias1 = torch.randn(sc.tokens[me], sc.hidden, generator=g).bfloat16().to(dev)
    comb = buf.combine(res.recv_x, res.handle, topk_weights=res.recv_topk_weights, bias=(bias0, bias1))
    copies = layout.is_token_in_rank.sum(dim=1, keepdim=True).float()
    want = ((mine.x.float() * copies) + bias0.float() + bias1.float()).bfloat16()
    assert torch.equal(comb.combined_x, want)
    assert torch.equal(comb.combined_topk_weights, torch.where(mine.topk_idx >= 0, mine.topk_weights, 0.0))

    # Cached dispatch with other data, then combine without weights or bias.
    cached = buf.dispatch(mine.x_random, handle=res.handle)
    assert cached.recv_topk_idx is None and cached.handle is None and cached.num_recv_tokens_per_expert_list is None
    for i, (s, t) in enumerate(rows):
        assert torch.equal(cached.recv_x[i], inputs[s].x_random[t])
    comb = buf.combine(cached.recv_x, res.handle)
    assert comb.combined_topk_weights is None
    assert torch.equal(comb.combined_x, (mine.x_random.float() * copies).bfloat16())

    # FP8 rows with column-major scales travel bit for bit.
    data, scales = fp8_pair(mine.x_random)
    res8 = buf.dispatch((data, scales), handle=res.handle)
    recv_data, recv_scales = res8.recv_x
    for i, (s, t) in enumerate(rows):
        want_data, want_scales = fp8_pair(inputs[s].x_random[t:t + 1])
        assert torch.equal(recv_data[i].view(torch.uint8), want_data[0].view(torch.uint8))
        assert torch.equal(recv_scales[i], want_scales[0])

    # num_worst_tokens: fixed row count, padding marked by -1, no per-expert list.
    worst = int(counts.sum(0).max()) + 3
    padded = buf.dispatch(mine.x, num_tokens_per_rank=layout.num_tokens_per_rank,
                          is_token_in_rank=layout.is_token_in_rank, num_tokens_per_expert=layout.num_tokens_per_expert,
                          topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, num_worst_tokens=worst)
    m = len(rows)
    assert padded.recv_x.shape[0] == worst and padded.num_recv_tokens_per_expert_list == []
    assert torch.equal(padded.recv_x[:m], res.recv_x)
    assert torch.equal(padded.recv_topk_idx[:m], res.recv_topk_idx)
    assert bool((padded.recv_topk_idx[m:] == -1).all()) and bool((padded.recv_topk_weights[m:] == 0).all())
    assert torch.equal(padded.handle.rank_prefix_matrix, res.handle.rank_prefix_matrix)
    comb = buf.combine(padded.recv_x, padded.handle)
    assert torch.equal(comb.combined_x, (mine.x.float() * copies).bfloat16())
    return {"received": m}


def check_random_round_trip(backend: str, sc: Scenario, rounds: int = 3) -> None:
    """combine(dispatch(x)) == x times the number of ranks each token went to, on random data."""
    me, dev = dist.get_rank(), device()
    buf = make_buffer(backend)
    for i in range(rounds):
        g = torch.Generator().manual_seed(1000 * i + me)
        n = sc.tokens[me]
        x = torch.randn(n, sc.hidden, generator=g).bfloat16().to(dev)
        idx = torch.randint(-1, sc.num_experts, (n, sc.topk), generator=g).to(dev)
        layout = buf.get_dispatch_layout(idx, sc.num_experts)
        res = buf.dispatch(x, num_tokens_per_rank=layout.num_tokens_per_rank, is_token_in_rank=layout.is_token_in_rank,
                           num_tokens_per_expert=layout.num_tokens_per_expert, topk_idx=idx)
        out = buf.combine(res.recv_x, res.handle).combined_x
        copies = layout.is_token_in_rank.sum(dim=1, keepdim=True).float()
        assert torch.equal(out, (x.float() * copies).bfloat16())


def check_async_and_events(backend: str, sc: Scenario) -> None:
    """previous_event / async_finish / allocate_on_comm_stream give the same results as the defaults."""
    me, dev = dist.get_rank(), device()
    mine = all_inputs(sc, dev)[me]
    buf = make_buffer(backend)
    before = Buffer.capture()
    layout = buf.get_dispatch_layout(mine.topk_idx, sc.num_experts, previous_event=before, async_finish=True,
                                     allocate_on_comm_stream=True)
    layout.event.current_stream_wait()
    res = buf.dispatch(mine.x, num_tokens_per_rank=layout.num_tokens_per_rank, is_token_in_rank=layout.is_token_in_rank,
                       num_tokens_per_expert=layout.num_tokens_per_expert, topk_idx=mine.topk_idx,
                       previous_event=layout.event, async_finish=True, allocate_on_comm_stream=True)
    with res.event:
        pass
    comb = buf.combine(res.recv_x, res.handle, async_finish=True)
    comb.event.current_stream_wait()
    copies = layout.is_token_in_rank.sum(dim=1, keepdim=True).float()
    assert torch.equal(comb.combined_x, (mine.x.float() * copies).bfloat16())


def stand_in_expert(recv_x: torch.Tensor, recv_count: torch.Tensor, rank: int) -> torch.Tensor:
    """Expert outputs that differ per expert (global expert g scales its rows by g + 1), so a
    combine that mixed up slots or experts is caught. Rows past ``recv_count`` stay zero."""
    e_loc = recv_x.shape[0]
    out = torch.zeros(recv_x.shape, dtype=torch.bfloat16, device=recv_x.device)
    for e in range(e_loc):
        n = int(recv_count[e])
        out[e, :n] = (recv_x[e, :n].float() * (rank * e_loc + e + 1)).bfloat16()
    return out


def expected_combine(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, transform=None) -> torch.Tensor:
    """What low-latency combine returns after ``stand_in_expert``: sum over slots (in order) of
    w_k * bf16(row * (g_k + 1)), in float32, then bf16."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    rows = transform(x) if transform is not None else x.float()
    for k in range(idx.shape[1]):
        g = idx[:, k]
        y = (rows * (g.clamp(min=0) + 1).unsqueeze(1).float()).bfloat16().float()
        acc = acc + torch.where((g >= 0).unsqueeze(1), weights[:, k:k + 1] * y, 0.0)
    return acc.bfloat16()


def check_low_latency(backend: str, sc: Scenario, max_tokens: int, use_fp8: bool = False, round_scale: bool = False,
                      use_ue8m0: bool = False, hook: bool = False) -> dict:
    """Low-latency dispatch layout, contents and statistics, then the weighted combine (plain,
    ``out=``, zero-copy), on rank-coded inputs."""
    me, dev = dist.get_rank(), device()
    inputs = all_inputs(sc, dev)
    mine = inputs[me]
    buf = make_buffer(backend, sc, low_latency_max_tokens=max_tokens)
    e_loc, rows_per_expert = sc.experts_per_rank, sc.world * max_tokens
    stats = torch.zeros(e_loc, dtype=torch.int32, device=dev)
    x = mine.x_random if use_fp8 else mine.x
    res = buf.low_latency_dispatch(x, mine.topk_idx, max_tokens, sc.num_experts, cumulative_local_expert_recv_stats=stats,
                                   use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
                                   return_recv_hook=hook)
    res.hook()
    slabs = expected_low_latency(sc, inputs, me)
    src_info, layout_range, t_max, hidden, num_experts = res.handle
    assert (t_max, hidden, num_experts) == (max_tokens, sc.hidden, sc.num_experts)
    assert res.recv_count.cpu().tolist() == [len(s) for s in slabs]
    assert stats.cpu().tolist() == [len(s) for s in slabs]
    if use_fp8:
        data, scales = res.recv_x
        assert data.shape == (e_loc, rows_per_expert, sc.hidden)
        groups = sc.hidden // 128
        width = groups // 4 if use_ue8m0 else groups
        assert scales.shape == (e_loc, rows_per_expert, width)
        assert scales.stride(1) == 1, "scales must be column-major in their last two dimensions"
    else:
        assert res.recv_x.shape == (e_loc, rows_per_expert, sc.hidden)
    for e, slab in enumerate(slabs):
        for i, (s, t, _) in enumerate(slab):
            src_row = (inputs[s].x_random if use_fp8 else inputs[s].x)[t:t + 1]
            if use_fp8:
                want_data, want_scales = per_token_cast_to_fp8(src_row, round_scale)
                assert torch.equal(data[e, i].view(torch.uint8), want_data[0].view(torch.uint8))
                want_scales = pack_ue8m0(want_scales)[0] if use_ue8m0 else want_scales[0]
                assert torch.equal(scales[e, i], want_scales)
            else:
                assert torch.equal(res.recv_x[e, i], src_row[0]), f"expert {e} row {i} should be ({s}, {t})"
            assert int(src_info[e, i]) == t
        begin = 0
        for s in range(sc.world):
            n = sum(1 for src, _, _ in slab if src == s)
            assert int(layout_range[e, s]) == (begin << 32) | n, f"layout_range[{e}, {s}]"
            begin += n

    # Combine, weighted, three ways.
    if use_fp8:
        data, scales = res.recv_x
        expert_in = per_token_cast_back(data, scales.contiguous(), torch.bfloat16)
        def transform(rows: torch.Tensor) -> torch.Tensor:  # what the owner's expert sees: dequantised, in bf16
            return per_token_cast_back(*per_token_cast_to_fp8(rows, round_scale), torch.bfloat16).float()
    else:
        expert_in, transform = res.recv_x, None
    y = stand_in_expert(expert_in, res.recv_count, me)
    want = expected_combine(x, mine.topk_idx, mine.topk_weights, transform)
    out = buf.low_latency_combine(y, mine.topk_idx, mine.topk_weights, res.handle, return_recv_hook=hook)
    out.hook()
    torch.testing.assert_close(out.combined_x, want, rtol=1e-2, atol=1e-2)
    exact = torch.equal(out.combined_x, want)
    given = torch.empty_like(want)
    res2 = buf.low_latency_combine(y, mine.topk_idx, mine.topk_weights, res.handle, out=given)
    assert res2.combined_x.data_ptr() == given.data_ptr()
    torch.testing.assert_close(given, want, rtol=1e-2, atol=1e-2)
    staging = buf.get_next_low_latency_combine_buffer(res.handle)
    assert staging.shape == (e_loc, rows_per_expert, sc.hidden) and staging.dtype == torch.bfloat16
    staging.copy_(y)
    res3 = buf.low_latency_combine(y, mine.topk_idx, mine.topk_weights, res.handle, zero_copy=True)
    torch.testing.assert_close(res3.combined_x, want, rtol=1e-2, atol=1e-2)
    return {"received": [len(s) for s in slabs], "exact": exact}


def check_low_latency_back_to_back(backend: str, sc: Scenario, max_tokens: int) -> None:
    """Two dispatches before either combine: the alternating buffers keep both results intact."""
    me, dev = dist.get_rank(), device()
    inputs = all_inputs(sc, dev)
    other = all_inputs(Scenario(**{**sc.__dict__, "seed": sc.seed + 1}), dev)
    buf = make_buffer(backend, sc, low_latency_max_tokens=max_tokens)
    first = buf.low_latency_dispatch(inputs[me].x, inputs[me].topk_idx, max_tokens, sc.num_experts, use_fp8=False)
    y1 = stand_in_expert(first.recv_x, first.recv_count, me)
    second = buf.low_latency_dispatch(other[me].x_random, other[me].topk_idx, max_tokens, sc.num_experts,
                                      use_fp8=False)
    y2 = stand_in_expert(second.recv_x, second.recv_count, me)
    out1 = buf.low_latency_combine(y1, inputs[me].topk_idx, inputs[me].topk_weights, first.handle).combined_x
    out2 = buf.low_latency_combine(y2, other[me].topk_idx, other[me].topk_weights, second.handle).combined_x
    torch.testing.assert_close(out1, expected_combine(inputs[me].x, inputs[me].topk_idx, inputs[me].topk_weights),
                               rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out2, expected_combine(other[me].x_random, other[me].topk_idx,
                                                      other[me].topk_weights), rtol=1e-2, atol=1e-2)
    # After a clean, the buffers start over and a round is still right.
    buf.clean_low_latency_buffer(max_tokens, sc.hidden, sc.num_experts)
    again = buf.low_latency_dispatch(inputs[me].x, inputs[me].topk_idx, max_tokens, sc.num_experts, use_fp8=False)
    y = stand_in_expert(again.recv_x, again.recv_count, me)
    out = buf.low_latency_combine(y, inputs[me].topk_idx, inputs[me].topk_weights, again.handle).combined_x
    torch.testing.assert_close(out, expected_combine(inputs[me].x, inputs[me].topk_idx, inputs[me].topk_weights),
                               rtol=1e-2, atol=1e-2)

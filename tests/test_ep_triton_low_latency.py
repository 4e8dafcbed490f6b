"""The triton backend of low-latency dispatch / combine, against the torch backend (the oracle).

What the backend-parametrized tests (test_ep_low_latency.py) do not cover: bit-exact agreement
with ``TorchLowLatency`` on random inputs (data, scales, counts, src_info, layout_range, the
combine's sums, in slot order or, where the combine sums on the experts' side, in rank order),
the receive hook with two micro-batches in flight, disagreeing ranks, a peer that never calls, and
on GPUs a size sweep and CUDA-graph capture / replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.distributed as dist

import ep_cases
from ep_inputs import Scenario, spread
from moekit.ep import Buffer
from moekit.ep.torch_low_latency import TorchLowLatency


@dataclass
class Case:
    """Sizes of one comparison; ``tokens[r]`` is rank r's N (<= T)."""

    tokens: list[int]
    T: int
    H: int
    E: int
    K: int
    fp8: bool = False
    round_scale: bool = False
    ue8m0: bool = False
    seed: int = 0
    empty: float = 0.25  # probability that a top-k slot is -1
    skip: list[int] = field(default_factory=list)  # ranks whose tokens all go to rank 0's experts
    presum: bool | None = None  # the engine's combine_presum (None: its own choice)


def _device() -> torch.device:
    return ep_cases.device()


def _inputs(case: Case, call: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random bf16 x [N, H], distinct top-k ids [N, K] with -1 slots, weights [N, K]."""
    me = dist.get_rank()
    gen = torch.Generator().manual_seed(case.seed * 1000 + call * 10 + me)
    n = case.tokens[me]
    x = (torch.randn(n, case.H, generator=gen) * 4).bfloat16()
    experts = case.E // dist.get_world_size() if me in case.skip else case.E
    idx = torch.rand(n, experts, generator=gen).topk(min(case.K, experts), dim=1).indices
    idx = torch.nn.functional.pad(idx, (0, case.K - idx.shape[1]), value=-1)
    idx = torch.where(torch.rand(n, case.K, generator=gen) < case.empty, -1, idx)
    weights = torch.rand(n, case.K, generator=gen)
    return x.to(dev), idx.to(dev), weights.to(dev)


def _buffer(case: Case, timeout_s: float = 60.0) -> Buffer:
    rdma = Buffer.get_low_latency_rdma_size_hint(case.T, case.H, dist.get_world_size(), case.E)
    buf = Buffer(None, num_rdma_bytes=rdma, low_latency_mode=True, backend="triton", timeout_s=timeout_s)
    buf._low_latency.combine_presum = case.presum
    return buf


def _combine_reference(case: Case, buf: Buffer, oracle: TorchLowLatency, y, idx, weights, handle) -> torch.Tensor:
    """The torch engine's combine in the order the triton engine sums this call (no hook)."""
    rank_order = buf._low_latency.presums(case.T, case.H, case.E, case.K, hook=False)
    if case.presum is not None:
        assert rank_order == case.presum, "the case asks for a protocol the engine did not take"
    ref, _ = oracle.combine(y, idx, weights, handle, zero_copy=False, out=None, defer_receive=False,
                            rank_order=rank_order)
    if rank_order:  # the two orders differ by float32 rounding only
        slot_order, _ = oracle.combine(y, idx, weights, handle, zero_copy=False, out=None, defer_receive=False)
        torch.testing.assert_close(ref, slot_order, rtol=1e-2, atol=1e-2)
    return ref


def _assert_dispatch_equal(case: Case, got, want) -> None:
    """Bit-exact: valid rows of data and scales, all counts, src_info, layout_range, src_rank/slot."""
    assert torch.equal(got.recv_count, want[1]), (got.recv_count, want[1])
    for name in ("src_info", "layout_range", "src_rank", "src_slot"):
        assert torch.equal(getattr(got.handle, name), getattr(want[2], name)), name
    for handle in (got.handle, want[2]):  # token_rows is defined only for the pairs received
        rows = torch.nonzero(handle.src_rank.flatten() >= 0).flatten()
        at = handle.token_rows[handle.src_rank.flatten()[rows], handle.src_info.flatten()[rows].long(),
                               handle.src_slot.flatten()[rows]]
        assert torch.equal(at.long(), rows), "token_rows"
    for e, n in enumerate(want[1].tolist()):
        if case.fp8:
            assert torch.equal(got.recv_x[0][e, :n].view(torch.uint8), want[0][0][e, :n].view(torch.uint8)), e
            assert torch.equal(got.recv_x[1][e, :n], want[0][1][e, :n]), e
            assert got.recv_x[1].stride() == want[0][1].stride()
        else:
            assert torch.equal(got.recv_x[e, :n], want[0][e, :n]), e


def _expert(recv_x: torch.Tensor, rank: int) -> torch.Tensor:
    """A stand-in expert: bf16 [E_loc, R*T, H] rows scaled per global expert (g + 1) / 8."""
    rows = recv_x.float() if recv_x.dtype == torch.bfloat16 else recv_x.float()
    scale = (rank * rows.shape[0] + torch.arange(rows.shape[0], device=rows.device) + 1).float() / 8
    return (rows * scale.view(-1, 1, 1)).bfloat16()


def compare_with_torch(case: Case, calls: int = 2) -> list[int]:
    """``calls`` dispatch + combine rounds on fresh inputs, each checked bit for bit against the
    torch engine; returns the rows this rank received."""
    dev = _device()
    buf = _buffer(case)
    oracle = TorchLowLatency(dist.group.WORLD, dev)
    e_loc = case.E // dist.get_world_size()
    received = []
    for call in range(calls):
        x, idx, weights = _inputs(case, call, dev)
        stats = torch.full((e_loc,), 3, dtype=torch.int32, device=dev)
        want_stats = stats.clone()
        got = buf.low_latency_dispatch(x, idx, case.T, case.E, cumulative_local_expert_recv_stats=stats,
                                       use_fp8=case.fp8, round_scale=case.round_scale, use_ue8m0=case.ue8m0)
        want = oracle.dispatch(x, idx, case.T, case.E, use_fp8=case.fp8, round_scale=case.round_scale,
                               use_ue8m0=case.ue8m0, cumulative_local_expert_recv_stats=want_stats,
                               defer_receive=False)
        _assert_dispatch_equal(case, got, want)
        assert torch.equal(stats, want_stats)
        y = _expert(got.recv_x[0] if case.fp8 else got.recv_x, dist.get_rank())
        out = buf.low_latency_combine(y, idx, weights, got.handle).combined_x
        ref = _combine_reference(case, buf, oracle, y, idx, weights, want[2])
        assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
        received.append(int(got.recv_count.sum()))
    return received


def hook_two_micro_batches(case: Case) -> None:
    """Sends of batches A and B, then both receive hooks; nothing is received before its hook
    (the statistics only move then), and both batches' results are exact after."""
    dev = _device()
    buf = _buffer(case)
    oracle = TorchLowLatency(dist.group.WORLD, dev)
    e_loc = case.E // dist.get_world_size()
    batches = [_inputs(case, call, dev) for call in range(2)]
    stats = torch.zeros(e_loc, dtype=torch.int32, device=dev)
    sent = [buf.low_latency_dispatch(x, idx, case.T, case.E, cumulative_local_expert_recv_stats=stats,
                                     use_fp8=case.fp8, return_recv_hook=True) for x, idx, _ in batches]
    assert int(stats.sum()) == 0, "the receive ran before its hook"
    wants = []
    for res, (x, idx, _) in zip(sent, batches):
        res.hook()
        wants.append(oracle.dispatch(x, idx, case.T, case.E, use_fp8=case.fp8, round_scale=False, use_ue8m0=False,
                                     cumulative_local_expert_recv_stats=None, defer_receive=False))
        _assert_dispatch_equal(case, res, wants[-1])
    assert torch.equal(stats, wants[0][1] + wants[1][1])
    ys = [_expert(r.recv_x[0] if case.fp8 else r.recv_x, dist.get_rank()) for r in sent]
    # The next sends reuse A's parity: every rank must have run A's hook first (see the engine's
    # docstring); a peer may still be in it when this rank is done with B.
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    # Zero copy for B: its combine is the call after A's, so the buffer is asked for after A's send.
    combined = [buf.low_latency_combine(ys[0], batches[0][1], batches[0][2], sent[0].handle, return_recv_hook=True)]
    staging = buf.get_next_low_latency_combine_buffer(sent[1].handle)
    staging.copy_(ys[1])
    given = torch.full((case.tokens[dist.get_rank()], case.H), 7.0, dtype=torch.bfloat16, device=dev)
    combined.append(buf.low_latency_combine(None, batches[1][1], batches[1][2], sent[1].handle, zero_copy=True,
                                            return_recv_hook=True, out=given))
    assert combined[1].combined_x.data_ptr() == given.data_ptr()
    for comb, y, (x, idx, w), want in zip(combined, ys, batches, wants):
        comb.hook()
        ref, _ = oracle.combine(y, idx, w, want[2], zero_copy=False, out=None, defer_receive=False)
        assert torch.equal(comb.combined_x, ref)


def disagreeing_ranks(case: Case) -> str:
    """Rank 1 dispatches with another top-k than the other ranks: all raise ValueError naming two
    ranks, without a host collective; after ``clean_low_latency_buffer`` calls work again."""
    case = on_every_rank(case)
    dev = _device()
    me = dist.get_rank()
    buf = _buffer(case, timeout_s=20.0)
    x, idx, _ = _inputs(case, 0, dev)
    if me == 1:
        idx = idx[:, :-1].contiguous()
    with pytest.raises(ValueError, match=r"ranks \d and \d disagree") as info:
        res = buf.low_latency_dispatch(x, idx, case.T, case.E, use_fp8=False)
        if dev.type == "cuda":  # the record is read by the next call on GPUs
            torch.cuda.synchronize()
            buf.low_latency_dispatch(x, idx, case.T, case.E, use_fp8=False)
        del res
    buf.clean_low_latency_buffer(case.T, case.H, case.E)
    x, idx, w = _inputs(case, 1, dev)
    res = buf.low_latency_dispatch(x, idx, case.T, case.E, use_fp8=False)
    buf.low_latency_combine(_expert(res.recv_x, me), idx, w, res.handle)
    return str(info.value)


def lonely_dispatch(case: Case, timeout_s: float) -> str:
    """Only rank 0 calls: its receive gives up after the Buffer's time limit and names the peer."""
    case = on_every_rank(case)
    dev = _device()
    buf = _buffer(case, timeout_s=timeout_s)
    if dist.get_rank() != 0:
        return ""
    x, idx, _ = _inputs(case, 0, dev)
    with pytest.raises(TimeoutError) as info:
        buf.low_latency_dispatch(x, idx, case.T, case.E, use_fp8=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            buf._low_latency.check()
    return str(info.value)


def lonely_combine(case: Case, timeout_s: float) -> str:
    """Every rank dispatches, then only rank 0 combines, summing on the experts' side: its wait
    for the peers' weights gives up after the time limit and names the peer."""
    case = on_every_rank(case)
    dev = _device()
    buf = _buffer(case, timeout_s=timeout_s)
    x, idx, w = _inputs(case, 0, dev)
    res = buf.low_latency_dispatch(x, idx, case.T, case.E, use_fp8=False)
    if dist.get_rank() != 0:
        return ""
    with pytest.raises(TimeoutError) as info:
        buf.low_latency_combine(_expert(res.recv_x, 0), idx, w, res.handle)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            buf._low_latency.check()
    return str(info.value)


CPU_CASES = {
    "bf16-2": Case(tokens=[4, 3], T=4, H=136, E=6, K=3),
    "fp8-2-one-empty": Case(tokens=[0, 5], T=5, H=256, E=4, K=2, fp8=True, seed=1),
    "fp8-round-2-full": Case(tokens=[4, 4], T=4, H=384, E=8, K=4, fp8=True, round_scale=True, seed=2),
    "ue8m0-3": Case(tokens=[3, 4, 2], T=4, H=512, E=6, K=2, fp8=True, round_scale=True, ue8m0=True, seed=3),
    "topk1-3-receives-nothing": Case(tokens=[2, 3, 3], T=3, H=128, E=9, K=1, empty=0.0, skip=[0, 1, 2], seed=4),
    # The combine summing on the experts' side (a rank without tokens, 3 ranks, a rank receiving nothing).
    "presum-fp8-2-one-empty": Case(tokens=[0, 5], T=5, H=256, E=4, K=3, fp8=True, seed=6, presum=True),
    "presum-bf16-3": Case(tokens=[3, 4, 2], T=4, H=384, E=6, K=4, seed=7, presum=True),
    "presum-topk1-3-receives-nothing": Case(tokens=[2, 3, 3], T=3, H=128, E=9, K=1, empty=0.0, skip=[0, 1, 2],
                                            seed=8, presum=True),
}


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_matches_torch(clusters, name):
    case = CPU_CASES[name]
    received = clusters(len(case.tokens)).run(compare_with_torch, case)
    if case.skip == [0, 1, 2]:
        assert all(r == [0, 0] for r in received[1:])


@pytest.mark.parametrize("fp8", [False, True])
def test_hook_two_micro_batches(clusters, fp8):
    clusters(2).run(hook_two_micro_batches, Case(tokens=[3, 5], T=5, H=256, E=4, K=3, fp8=fp8, seed=5))


def test_disagreeing_ranks(clusters):
    messages = clusters(2).run(disagreeing_ranks, Case(tokens=[3, 3], T=4, H=128, E=4, K=3, empty=0.0))
    assert all("low_latency_dispatch" in m for m in messages)
    assert "rank 0 received from rank 1" in messages[0] and "rank 1 received from rank 0" in messages[1]


def test_timeout_names_op_rank_peer(clusters):
    # Under the interpreter the limit counts polls (about 1e4 a second), which run much slower.
    message = clusters(2).run(lonely_dispatch, Case(tokens=[2, 2], T=2, H=128, E=4, K=2), 0.02)[0]
    assert "low_latency_dispatch: rank 0 waited" in message and "for rank 1" in message
    message = clusters(2).run(lonely_combine, Case(tokens=[2, 2], T=2, H=128, E=4, K=2, presum=True), 0.02)[0]
    assert "low_latency_combine: rank 0 waited" in message and "for rank 1" in message


# ---------------------------------------------------------------------------------------------- GPU
GPU_CASES = [
    Case(tokens=[1, 0], T=1, H=2048, E=256, K=1, fp8=True),
    Case(tokens=[64, 64], T=64, H=4096, E=256, K=4, fp8=True, round_scale=True, seed=1),
    Case(tokens=[256, 201], T=256, H=7168, E=256, K=8, fp8=True, round_scale=True, ue8m0=True, seed=3),
    Case(tokens=[128, 128], T=128, H=7168, E=256, K=8, seed=4),
]


def on_every_rank(case: Case) -> Case:
    """``case`` for this group's size: its per-rank token counts repeated over the ranks."""
    return replace(case, tokens=spread(case.tokens, dist.get_world_size()))


def gpu_sweep() -> None:
    """Sizes of the issue (T 1 to 256, H 2048 to 7168, top-k 1 to 8, a rank without tokens), FP8 and
    bf16, each three calls back to back, then the shared low-latency checks on the triton backend."""
    world = dist.get_world_size()
    for case in GPU_CASES:
        compare_with_torch(on_every_rank(case), calls=3)
    hook_two_micro_batches(on_every_rank(Case(tokens=[128, 100], T=128, H=7168, E=256, K=8, fp8=True, seed=7)))
    for tokens, hidden, topk in [(1, 2048, 1), (128, 7168, 8)]:
        sc = Scenario(tokens=spread([tokens, tokens // 2], world), hidden=hidden, num_experts=256, topk=topk)
        ep_cases.check_low_latency("triton", sc, tokens, True, True, False, False)
    ep_cases.check_low_latency_back_to_back("triton", Scenario(tokens=spread([128, 64], world), hidden=7168,
                                                               num_experts=256, topk=8), 128)


def graph_replay(case: Case, replays: int = 6) -> None:
    """Dispatch, a stand-in expert and combine captured once; each replay gets new tokens and new
    routing copied into the captured inputs and is checked against the torch engine."""
    case = on_every_rank(case)
    dev = _device()
    buf = _buffer(case)
    oracle = TorchLowLatency(dist.group.WORLD, dev)
    x, idx, w = (t.clone() for t in _inputs(case, 0, dev))
    me = dist.get_rank()

    def step():
        res = buf.low_latency_dispatch(x, idx, case.T, case.E, use_fp8=case.fp8, round_scale=case.round_scale)
        y = _expert(res.recv_x[0] if case.fp8 else res.recv_x, me)
        return res, buf.low_latency_combine(y, idx, w, res.handle).combined_x

    step()  # eager: compiles the kernels and checks the arguments
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res, out = step()
    for replay in range(replays):
        nx, nidx, nw = _inputs(case, replay + 1, dev)
        x.copy_(nx), idx.copy_(nidx), w.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        buf._low_latency.check()
        want = oracle.dispatch(x, idx, case.T, case.E, use_fp8=case.fp8, round_scale=case.round_scale,
                               use_ue8m0=False, cumulative_local_expert_recv_stats=None, defer_receive=False)
        _assert_dispatch_equal(case, res, want)
        y = _expert(res.recv_x[0] if case.fp8 else res.recv_x, me)
        ref = _combine_reference(case, buf, oracle, y, idx, w, want[2])
        assert torch.equal(out, ref), f"replay {replay}"


@pytest.mark.gpu
def test_gpu_sweep(gpu_cluster):
    gpu_cluster.run(gpu_sweep)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [True, False])
def test_gpu_graph_replay(gpu_cluster, fp8):
    gpu_cluster.run(graph_replay, Case(tokens=[128, 128], T=128, H=7168, E=256, K=8, fp8=fp8, round_scale=fp8))


@pytest.mark.gpu
def test_gpu_errors(gpu_cluster):
    messages = gpu_cluster.run(disagreeing_ranks, Case(tokens=[8, 8], T=8, H=2048, E=16, K=4, empty=0.0))
    assert "rank 0 received from rank 1" in messages[0]
    message = gpu_cluster.run(lonely_dispatch, Case(tokens=[4, 4], T=4, H=2048, E=16, K=2), 0.5)[0]
    assert "low_latency_dispatch: rank 0 waited" in message

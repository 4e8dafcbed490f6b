"""The triton backend's high-throughput kernels: what the backend-parametrized tests do not reach.

Chunking through a small ``num_nvl_bytes``, FP8 with column-major scales, ``num_worst_tokens``
padding (these take the kernel-driven combine; the others, the copy-engine one), waits that time
out, and on GPUs: DeepEP's scale and a CUDA graph of the
``num_worst_tokens`` path. Every result is compared with the torch backend, bit for bit.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.distributed as dist

from moekit.ep import Buffer
from moekit.fp8 import per_token_cast_to_fp8


def _inputs(n: int, hidden: int, topk: int, num_experts: int, fp8: bool, rank_coded: bool, device):
    rank = dist.get_rank()
    if rank_coded:  # each value says where it came from: rank, token, channel
        x = (rank * 1000 + torch.arange(n)[:, None] * 8 + torch.arange(hidden)[None, :] % 8).float()
        x = (x / 64).to(torch.bfloat16)
    else:
        x = torch.randn(n, hidden).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts)[:topk] for _ in range(n)]) if n else \
        torch.empty(0, topk, dtype=torch.int64)
    idx[torch.rand(n, topk) < 0.1] = -1
    weights = torch.rand(n, topk)
    x, idx, weights = x.to(device), idx.to(device), weights.to(device)
    if fp8:
        data, scales = per_token_cast_to_fp8(x)
        return (data, scales.t().contiguous().t()), x, idx, weights  # column-major scales, as DeepGEMM makes them
    return x, x, idx, weights


def _same(a, b, what: str) -> None:
    if isinstance(a, (tuple, list)):
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{what}[{i}]")
        return
    if not isinstance(a, torch.Tensor):
        assert a == b, f"{what}: {a} != {b}"
        return
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    if a.dtype.is_floating_point and a.element_size() == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b), f"{what}: differs in {(a != b).sum().item()} of {a.numel()} elements"


def _round_trip(buf: Buffer, x, bf16, idx, weights, num_experts: int, worst: int):
    layout = buf.get_dispatch_layout(idx, num_experts)
    d = buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                     topk_idx=idx, topk_weights=weights, expert_alignment=4, num_worst_tokens=worst)
    cached = buf.dispatch(x, handle=d.handle, num_worst_tokens=worst)
    rows = d.recv_x[0] if isinstance(d.recv_x, tuple) else d.recv_x
    processed = (rows.float() * 1.5).to(torch.bfloat16)
    c = buf.combine(processed, d.handle, topk_weights=d.recv_topk_weights, bias=(bf16, bf16))
    return [d.recv_x, d.recv_topk_idx, d.recv_topk_weights, d.num_recv_tokens_per_expert_list,
            d.handle.rank_prefix_matrix, d.handle.recv_src_idx, cached.recv_x, c.combined_x, c.combined_topk_weights]


def check_against_torch(n: int, hidden: int, topk: int, num_experts: int, num_nvl_bytes: int, fp8: bool,
                        rank_coded: bool, worst: int, seed: int = 0) -> int:
    """On every rank: the triton backend's dispatch / cached dispatch / combine equal the torch backend's."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    torch.manual_seed(seed + dist.get_rank())
    if not worst:  # ranks with different token counts (with num_worst_tokens a chunked combine needs equal ones)
        n = n + dist.get_rank()
    x, bf16, idx, weights = _inputs(n, hidden, topk, num_experts, fp8, rank_coded, device)
    triton_buf = Buffer(num_nvl_bytes=num_nvl_bytes, backend="triton")
    torch_buf = Buffer(backend="torch")
    got = _round_trip(triton_buf, x, bf16, idx, weights, num_experts, worst)
    want = _round_trip(torch_buf, x, bf16, idx, weights, num_experts, worst)
    names = ["recv_x", "recv_topk_idx", "recv_topk_weights", "per_expert", "rank_prefix_matrix", "recv_src_idx",
             "cached recv_x", "combined_x", "combined_topk_weights"]
    for name, a, b in zip(names, got, want):
        _same(a, b, name)
    return int(got[5].numel())


def check_paths_interleaved(n: int, hidden: int, num_nvl_bytes: int) -> None:
    """Combines through the copy engines and through kernels, interleaved with dispatches on one buffer
    (so the flags of each path follow the other's), equal the torch backend's."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    world = dist.get_world_size()
    torch.manual_seed(11 + dist.get_rank())
    x, _, idx, weights = _inputs(n + 3 * dist.get_rank(), hidden, 3, 4 * world, False, False, device)
    worst = (n + 3 * world) * world  # at least every rank's received rows

    def run(buf: Buffer) -> list:
        layout = buf.get_dispatch_layout(idx, 4 * world)
        args = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                    topk_idx=idx, topk_weights=weights)
        plain = buf.dispatch(x, **args)
        first = buf.combine(plain.recv_x, plain.handle, topk_weights=plain.recv_topk_weights)
        padded = buf.dispatch(x, **args, num_worst_tokens=worst)  # its handle has no host counts: kernel path
        second = buf.combine((padded.recv_x.float() * 3).bfloat16(), padded.handle, bias=x)
        third = buf.combine((plain.recv_x.float() * 0.5).bfloat16(), plain.handle, topk_weights=plain.recv_topk_weights)
        return [first.combined_x, first.combined_topk_weights, second.combined_x, third.combined_x,
                third.combined_topk_weights]

    got = run(Buffer(num_nvl_bytes=num_nvl_bytes, backend="triton"))
    want = run(Buffer(backend="torch"))
    for i, (a, b) in enumerate(zip(got, want)):
        _same(a, b, f"result {i}")


def check_timeout() -> str:
    """Rank 0 dispatches alone: its count exchange gives up after 1 s and names a peer."""
    buf = Buffer(num_nvl_bytes=1 << 16, backend="triton", timeout_s=1.0)
    device = buf.device
    idx = torch.tensor([[0], [1]], device=device)
    layout = buf.get_dispatch_layout(idx, 2 * dist.get_world_size())
    if dist.get_rank() == 1:
        return ""
    x = torch.ones(2, 128, dtype=torch.bfloat16, device=device)
    with pytest.raises(TimeoutError) as info:
        buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                     topk_idx=idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
            buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                         num_tokens_per_expert=layout[2], topk_idx=idx)
    return str(info.value)


def check_combine_timeout() -> str:
    """Both ranks dispatch, rank 0 combines alone: its wait for rank 1's copied rows gives up."""
    buf = Buffer(num_nvl_bytes=1 << 16, backend="triton", timeout_s=1.0)
    device = buf.device
    idx = torch.tensor([[0, 2], [1, 3]], device=device)
    layout = buf.get_dispatch_layout(idx, 4)
    x = torch.ones(2, 128, dtype=torch.bfloat16, device=device)
    d = buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                     topk_idx=idx)
    if dist.get_rank() == 1:
        return ""
    with pytest.raises(TimeoutError) as info:
        buf.combine(d.recv_x, d.handle)
    return str(info.value)


def _round_warnings(buf: Buffer, x, args: dict) -> list:
    """UserWarnings of two dispatches and two combines on ``buf`` (the interpreter raises others)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", UserWarning)
        for _ in range(2):
            d = buf.dispatch(x, **args)
            buf.combine(d.recv_x, d.handle, topk_weights=d.recv_topk_weights)
    return caught


def check_round_warnings() -> tuple[list[str], list[str], list[str]]:
    """A buffer of about 4 rows: dispatch and combine each warn once that they run in rounds, naming
    the bytes that would hold one; a buffer of those bytes warns no more."""
    device = torch.device("cpu")
    torch.manual_seed(3 + dist.get_rank())
    x, _, idx, weights = _inputs(9, 128, 2, 4, False, False, device)
    small = Buffer(num_nvl_bytes=4 * (128 * 2 + 64), backend="triton")
    layout = small.get_dispatch_layout(idx, 4)
    args = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                topk_idx=idx, topk_weights=weights)
    caught = _round_warnings(small, x, args)
    messages = [str(w.message) for w in caught]
    enough = max(int(re.search(r"; (\d+) bytes would hold it in one", m).group(1)) for m in messages)
    again = _round_warnings(Buffer(num_nvl_bytes=enough, backend="triton"), x, args)
    return messages, [w.filename for w in caught], [str(w.message) for w in again]


def _captured(step):
    """(graph, outputs): ``step`` run once to compile and warm up, then captured in a CUDA graph."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs


def check_cuda_graph(n: int, hidden: int, topk: int, num_experts: int) -> None:
    """The num_worst_tokens path captured once, replayed with new inputs of the same sizes."""
    device = torch.device("cuda", torch.cuda.current_device())
    worst = n * dist.get_world_size()
    buf = Buffer(num_nvl_bytes=2 * worst * (hidden * 2 + 128), backend="triton")
    ref = Buffer(backend="torch")
    torch.manual_seed(5 + dist.get_rank())
    x, _, idx, weights = _inputs(n, hidden, topk, num_experts, False, False, device)
    layout = buf.get_dispatch_layout(idx, num_experts)
    static = [x.clone(), idx.clone(), weights.clone(), layout[0].clone(), layout[3].clone(), layout[2].clone()]

    def step():
        d = buf.dispatch(static[0], num_tokens_per_rank=static[3], is_token_in_rank=static[4],
                         num_tokens_per_expert=static[5], topk_idx=static[1], topk_weights=static[2],
                         num_worst_tokens=worst)
        c = buf.combine(d.recv_x, d.handle, topk_weights=d.recv_topk_weights)
        return d.recv_x, d.recv_topk_idx, c.combined_x, c.combined_topk_weights

    graph, outs = _captured(step)
    for trial in range(3):
        x, _, idx, weights = _inputs(n, hidden, topk, num_experts, False, False, device)
        layout = ref.get_dispatch_layout(idx, num_experts)
        for dst, src in zip(static, [x, idx, weights, layout[0], layout[3], layout[2]]):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        d = ref.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                         topk_idx=idx, topk_weights=weights, num_worst_tokens=worst)
        c = ref.combine(d.recv_x, d.handle, topk_weights=d.recv_topk_weights)
        _same(list(outs), [d.recv_x, d.recv_topk_idx, c.combined_x, c.combined_topk_weights], f"replay {trial}")


def check_cuda_graph_cached(n: int, hidden: int, topk: int, num_experts: int) -> None:
    """A handle's cached dispatch and combine (at this size the copy-engine combine) captured once and
    replayed with new rows on the same routing."""
    device = torch.device("cuda", torch.cuda.current_device())
    buf = Buffer(num_nvl_bytes=1 << 30, backend="triton")
    ref = Buffer(backend="torch")
    torch.manual_seed(7 + dist.get_rank())
    x, _, idx, weights = _inputs(n, hidden, topk, num_experts, False, False, device)
    layout = buf.get_dispatch_layout(idx, num_experts)
    args = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                topk_idx=idx, topk_weights=weights)
    d = buf.dispatch(x, **args)  # reads the counts: outside the graph
    static_x = x.clone()

    def step():
        cached = buf.dispatch(static_x, handle=d.handle)
        c = buf.combine((cached.recv_x.float() * 2).bfloat16(), d.handle, topk_weights=d.recv_topk_weights)
        return cached.recv_x, c.combined_x, c.combined_topk_weights

    graph, outs = _captured(step)
    for trial in range(3):
        static_x.copy_(torch.randn_like(x, dtype=torch.float32).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        r = ref.dispatch(static_x, **args)
        c = ref.combine((r.recv_x.float() * 2).bfloat16(), r.handle, topk_weights=r.recv_topk_weights)
        _same(list(outs), [r.recv_x, c.combined_x, c.combined_topk_weights], f"replay {trial}")


@pytest.mark.parametrize("fp8", [False, True])
def test_chunked_three_ranks(clusters, fp8):
    # About 8 rows per round: every call runs 2 or 3 rounds through the buffer.
    hidden = 256 if fp8 else 128
    worst = 20 if fp8 else 0
    rows = clusters(3).run(check_against_torch, 5, hidden, 3, 6, 8 * (hidden * 2 + 64), fp8, not fp8, worst)
    assert not fp8 or sum(rows) == 3 * worst


def test_unchunked_two_ranks_real_rows(clusters):
    clusters(2).run(check_against_torch, 9, 128, 4, 8, 1 << 16, False, False, 0, 3)


def test_more_experts_than_the_count_exchange_carries(clusters):
    # 2048 experts: the per-expert list is counted from the received rows instead.
    clusters(2).run(check_against_torch, 7, 128, 4, 2048, 1 << 16, False, False, 0, 5)


@pytest.mark.parametrize("world", [2, 3])
def test_copy_and_kernel_combines_interleaved(clusters, world):
    clusters(world).run(check_paths_interleaved, 6, 128, 1 << 16)


def test_rounds_warn_once_with_the_bytes_for_one(clusters):
    for messages, files, again in clusters(2).run(check_round_warnings):
        assert len(messages) == 2, messages
        assert re.match(r"num_nvl_bytes: 1280 bytes split this dispatch into \d+ rounds", messages[0]), messages
        assert re.match(r"num_nvl_bytes: 1280 bytes split this combine into \d+ rounds", messages[1]), messages
        assert all(f.endswith("test_ep_triton_normal.py") for f in files), files  # points at the caller
        assert again == [], again


def test_timeout_names_op_rank_and_peer(clusters):
    message = clusters(2).run(check_timeout)[0]
    assert message.startswith("notify: rank 0 waited more than 1 s for rank 1"), message


def test_combine_timeout_names_op_rank_and_peer(clusters):
    message = clusters(2).run(check_combine_timeout)[0]
    assert message.startswith("combine: rank 0 waited more than 1 s for rank 1"), message


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("rank_coded", [False, True])
def test_deepep_scale_gpu(gpu_cluster, fp8, rank_coded):
    gpu_cluster.run(check_against_torch, 4096, 7168, 8, 256, 1 << 30, fp8, rank_coded, 0)


@pytest.mark.gpu
def test_chunked_and_worst_tokens_gpu(gpu_cluster):
    worst = 1200 * gpu_cluster.world_size  # above any rank's received rows (at most 1000 per rank)
    gpu_cluster.run(check_against_torch, 1000, 7168, 8, 256, 16 << 20, True, False, worst)


@pytest.mark.gpu
def test_copy_and_kernel_combines_interleaved_gpu(gpu_cluster):
    # 3000 tokens of 7168: 41 MiB of rows from the largest rank, over the copy path's threshold.
    gpu_cluster.run(check_paths_interleaved, 3000, 7168, 1 << 30)


@pytest.mark.gpu
def test_timeout_gpu(gpu_cluster):
    message = gpu_cluster.run(check_timeout)[0]
    assert re.match(r"notify: rank 0 waited more than 1 s for rank [1-9]", message), message


@pytest.mark.gpu
def test_cuda_graph_cached_copy_combine_gpu(gpu_cluster):
    # 3000 tokens of 7168 on every rank: over the copy path's threshold.
    gpu_cluster.run(check_cuda_graph_cached, 3000, 7168, 8, 256)


@pytest.mark.gpu
def test_cuda_graph_worst_tokens_gpu(gpu_cluster):
    gpu_cluster.run(check_cuda_graph, 512, 7168, 8, 256)

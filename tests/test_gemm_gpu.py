"""Grouped and dense GEMMs on the GPU at DeepSeek-V3 shapes, against float64 references computed on
the GPU from the dequantised operands (``pytest -m gpu tests/test_gemm_gpu.py``; FP8 needs Hopper)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import gemm
from moekit.gemm import config, inputs, kernel, reference
from moekit.gemm.layout import contiguous_m_indices

pytestmark = pytest.mark.gpu
DEV = "cuda"
NAN = float("nan")
# DeepSeek-V3 expert GEMMs: gate+up projection (N = 2 x 2048, K = hidden 7168) and down projection.
V3_NK = [(4096, 7168), (7168, 2048)]


@pytest.fixture(autouse=True)
def _needs_cuda():
    # Selected with -m gpu on a machine without one: a failure, not a silent skip.
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA GPU")


def _ragged_counts(g: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 1500, (g,), generator=gen).tolist()
    counts[1], counts[-1] = 0, 1  # an empty expert and a single-row one
    return counts


@pytest.mark.parametrize("n,k", V3_NK)
@pytest.mark.parametrize("fp8", [True, False])
def test_contiguous_v3(fp8, n, k):
    torch.manual_seed(n + k + fp8)
    idx = contiguous_m_indices(_ragged_counts(8, n + k), DEV)
    a = inputs.activations((idx.numel(), k), fp8, DEV)
    b = inputs.weights((8, n, k), fp8, DEV)
    out = torch.full((idx.numel(), n), NAN, dtype=torch.bfloat16, device=DEV)
    gemm.m_grouped_gemm_contiguous(a, b, out, idx)
    reference.check(out, reference.contiguous_reference(a, b, idx), fp8)


@pytest.mark.parametrize("n,k", V3_NK)
@pytest.mark.parametrize("fp8", [True, False])
def test_masked_v3(fp8, n, k):
    torch.manual_seed(n * k + fp8)
    g, m_max = 8, 512
    a = inputs.activations((g, m_max, k), fp8, DEV)
    b = inputs.weights((g, n, k), fp8, DEV)
    masked_m = torch.randint(0, m_max + 1, (g,), dtype=torch.int32, device=DEV)
    masked_m[0], masked_m[1], masked_m[2] = 0, m_max, 1
    out = torch.full((g, m_max, n), NAN, dtype=torch.bfloat16, device=DEV)
    gemm.m_grouped_gemm_masked(a, b, out, masked_m, expected_m=128)
    reference.check(out, reference.masked_reference(a, b, masked_m), fp8)


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (128, 2112, 7168), (128, 24576, 1536), (4096, 7168, 2048),
                                   (4096, 32768, 512), (300, 7168, 16384)])
def test_dense_fp8(m, n, k):
    torch.manual_seed(m + n + k)
    a, b = inputs.activations((m, k), True, DEV), inputs.weights((n, k), True, DEV)
    out = torch.full((m, n), NAN, dtype=torch.bfloat16, device=DEV)
    gemm.gemm_fp8_nt(a, b, out)
    reference.check(out, reference.dense_reference(a, b), True)


@pytest.mark.parametrize("fp8", [True, False])
def test_every_candidate_tile_config(fp8):
    torch.manual_seed(11 + fp8)
    n, k = 4096, 2048
    idx = contiguous_m_indices(_ragged_counts(4, 5), DEV)
    a, b = inputs.activations((idx.numel(), k), fp8, DEV), inputs.weights((4, n, k), fp8, DEV)
    a_data, sa = a if fp8 else (a, None)
    b_data, sb = b if fp8 else (b, None)
    ref = reference.contiguous_reference(a, b, idx)
    out = torch.empty(idx.numel(), n, dtype=torch.bfloat16, device=DEV)
    for rows_hint in (32, 4096):
        for cfg in config.candidates(fp8, rows_hint, contiguous=True):
            out.fill_(NAN)
            kernel.launch(kernel.CONTIGUOUS, a_data, b_data, out, cfg, sa=sa, sb=sb, m_indices=idx)
            reference.check(out, ref, fp8)


@pytest.mark.parametrize("n,k", V3_NK + [(512, 1152)])  # 56, 16 and 9 (odd) K blocks
def test_k_loop_pair(n, k):
    """The FP8 "pair" K loop in every layout, against the reference (the candidates test above runs
    every pair candidate, contiguous only)."""
    torch.manual_seed(n + k)
    cfg = config.TileConfig(128, 128, 128, num_warps=8, num_stages=3, k_loop="pair")
    idx = contiguous_m_indices(_ragged_counts(4, n), DEV)
    a, b = inputs.activations((idx.numel(), k), True, DEV), inputs.weights((4, n, k), True, DEV)
    out = torch.full((idx.numel(), n), NAN, dtype=torch.bfloat16, device=DEV)
    kernel.launch(kernel.CONTIGUOUS, a[0], b[0], out, cfg, sa=a[1], sb=b[1], m_indices=idx)
    reference.check(out, reference.contiguous_reference(a, b, idx), True)
    g, m_max = 4, 320
    am = inputs.activations((g, m_max, k), True, DEV)
    masked_m = torch.tensor([m_max, 0, 1, 200], dtype=torch.int32, device=DEV)
    out = torch.full((g, m_max, n), NAN, dtype=torch.bfloat16, device=DEV)
    kernel.launch(kernel.MASKED, am[0], b[0], out, cfg, sa=am[1], sb=b[1], masked_m=masked_m)
    reference.check(out, reference.masked_reference(am, b, masked_m), True)
    x = inputs.activations((300, k), True, DEV)
    out = torch.full((300, n), NAN, dtype=torch.bfloat16, device=DEV)
    kernel.launch(kernel.DENSE, x[0], b[0][:1], out, cfg, sa=x[1], sb=b[1][:1])
    reference.check(out, reference.dense_reference(x, (b[0][0], b[1][0])), True)


def test_masked_in_a_cuda_graph():
    torch.manual_seed(12)
    g, m_max, n, k = 4, 256, 4096, 7168
    a, b = inputs.activations((g, m_max, k), True, DEV), inputs.weights((g, n, k), True, DEV)
    masked_m = torch.full((g,), m_max, dtype=torch.int32, device=DEV)
    out = torch.empty(g, m_max, n, dtype=torch.bfloat16, device=DEV)
    gemm.m_grouped_gemm_masked(a, b, out, masked_m, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemm.m_grouped_gemm_masked(a, b, out, masked_m, 128)
    for _ in range(2):
        masked_m.copy_(torch.randint(0, m_max + 1, (g,), dtype=torch.int32))
        out.fill_(NAN)
        graph.replay()
        reference.check(out, reference.masked_reference(a, b, masked_m), True)


def test_contiguous_bf16_flattened_in_a_cuda_graph():
    """The flattened bf16 loop lists its row tiles on the device, so a captured call follows new
    routing on replay: a worst-case buffer whose experts' rows change between replays, behind
    padding-only tiles; equal bit for bit to the nested loop."""
    torch.manual_seed(13)
    g, n, k, m_sum = 4, 4096, 2048, 8 * 128 * 4
    a, b = inputs.activations((m_sum, k), False, DEV), inputs.weights((g, n, k), False, DEV)
    idx = torch.full((m_sum,), -1, dtype=torch.int32, device=DEV)
    out = torch.empty(m_sum, n, dtype=torch.bfloat16, device=DEV)
    flat = config.candidates(False, 4096, contiguous=True)[0]
    assert flat.flatten
    nested = dataclasses.replace(flat, flatten=False)
    graph = torch.cuda.CUDAGraph()
    kernel.launch(kernel.CONTIGUOUS, a, b, out, flat, m_indices=idx)  # compile outside the capture
    with torch.cuda.graph(graph):
        kernel.launch(kernel.CONTIGUOUS, a, b, out, flat, m_indices=idx)
    for counts in ([300, 0, 1000, 129], [0, 0, 0, 0], [1024, 1024, 1024, 1024], [1, 2000, 0, 7]):
        routed = contiguous_m_indices(counts, DEV)
        idx.fill_(-1)
        idx[m_sum - routed.numel():] = routed  # padding-only tiles first
        out.fill_(NAN)
        graph.replay()
        reference.check(out, reference.contiguous_reference(a, b, idx), False)
        want = torch.full_like(out, NAN)
        kernel.launch(kernel.CONTIGUOUS, a, b, want, nested, m_indices=idx)
        assert torch.equal(out.nan_to_num(), want.nan_to_num()) and torch.equal(out.isnan(), want.isnan())

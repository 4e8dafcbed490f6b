"""Argument checks of moekit.gemm and the DeepGEMM-compatible scale layouts (no kernel runs here)."""

from __future__ import annotations

import pytest
import torch

from moekit import gemm
from moekit.compat import deep_gemm
from moekit.fp8 import pack_ue8m0
from moekit.gemm import inputs
from moekit.gemm.layout import contiguous_m_indices

K, N, G = 256, 192, 3


def _contiguous(fp8: bool, m: int = 256):
    a = inputs.activations((m, K), fp8, "cpu")
    b = inputs.weights((G, N, K), fp8, "cpu")
    out = torch.empty(m, N, dtype=torch.bfloat16)
    return a, b, out, contiguous_m_indices([100, 0, 120])


@pytest.mark.parametrize("fp8", [False, True])
def test_valid_arguments_reach_the_launch(fp8, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, b, out, idx = _contiguous(fp8)
    with pytest.raises(RuntimeError, match="CUDA device"):
        gemm.m_grouped_gemm_contiguous(a, b, out, idx)


def test_operand_kinds():
    a, b, out, idx = _contiguous(False)
    with pytest.raises(TypeError, match="a: expected a bf16"):
        gemm.m_grouped_gemm_contiguous(a.float(), b, out, idx)
    a8, b8, _, _ = _contiguous(True)
    with pytest.raises(TypeError, match="both"):
        gemm.m_grouped_gemm_contiguous(a, b8, out, idx)
    with pytest.raises(TypeError, match="a: FP8 data"):
        gemm.m_grouped_gemm_contiguous((a, a8[1]), b8, out, idx)
    with pytest.raises(TypeError, match="out: expected bfloat16"):
        gemm.m_grouped_gemm_contiguous(a, b, out.float(), idx)


def test_shapes_and_k():
    a, b, out, idx = _contiguous(False)
    with pytest.raises(ValueError, match="multiple of 128"):
        gemm.m_grouped_gemm_contiguous(a[:, :200].contiguous(), b[..., :200].contiguous(), out, idx)
    with pytest.raises(ValueError, match="b: K"):
        gemm.m_grouped_gemm_contiguous(a, b[..., :128].contiguous(), out, idx)
    with pytest.raises(ValueError, match="M_sum = 200"):
        gemm.m_grouped_gemm_contiguous(a[:200], b, out[:200], idx[:200])
    with pytest.raises(ValueError, match="out: expected shape"):
        gemm.m_grouped_gemm_contiguous(a, b, out[:, :100], idx)
    with pytest.raises(ValueError, match="b: must be contiguous"):
        gemm.m_grouped_gemm_contiguous(a, b.transpose(0, 1).contiguous().transpose(0, 1), out, idx)
    a8, b8, _, _ = _contiguous(True)
    with pytest.raises(ValueError, match="a scales"):
        gemm.m_grouped_gemm_contiguous((a8[0], a8[1][:, :1]), b8, out, idx)
    with pytest.raises(ValueError, match="b scales"):
        gemm.m_grouped_gemm_contiguous(a8, (b8[0], b8[1][:, :1]), out, idx)


def test_m_indices_contents():
    a, b, out, idx = _contiguous(False)
    with pytest.raises(ValueError, match="m_indices: expected int32"):
        gemm.m_grouped_gemm_contiguous(a, b, out, idx.long())
    bad = idx.clone()
    bad[5] = G
    with pytest.raises(ValueError, match=r"expert ids in \[0, 3\)"):
        gemm.m_grouped_gemm_contiguous(a, b, out, bad)
    mixed = idx.clone()
    mixed[120] = 2  # expert 2 inside expert 0's block
    with pytest.raises(ValueError, match="one expert"):
        gemm.m_grouped_gemm_contiguous(a, b, out, mixed)


def test_masked_arguments():
    a = inputs.activations((G, 100, K), False, "cpu")
    b = inputs.weights((G, N, K), False, "cpu")
    out = torch.empty(G, 100, N, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"masked_m: values must lie in \[0, M_max = 100\]"):
        gemm.m_grouped_gemm_masked(a, b, out, torch.tensor([1, 101, 0], dtype=torch.int32), 50)
    with pytest.raises(ValueError, match="masked_m: expected int32"):
        gemm.m_grouped_gemm_masked(a, b, out, torch.tensor([1, 1], dtype=torch.int32), 50)
    with pytest.raises(ValueError, match="expected_m"):
        gemm.m_grouped_gemm_masked(a, b, out, torch.tensor([1, 1, 1], dtype=torch.int32), -1)
    with pytest.raises(ValueError, match="b: expected 3 groups"):
        gemm.m_grouped_gemm_masked(a, b[:2], out, torch.tensor([1, 1, 1], dtype=torch.int32), 50)


def test_dense_needs_fp8_pairs():
    a = inputs.activations((64, K), False, "cpu")
    with pytest.raises(TypeError, match="pairs"):
        gemm.gemm_fp8_nt(a, a, torch.empty(64, 64, dtype=torch.bfloat16))


def test_contiguous_m_indices():
    idx = contiguous_m_indices([3, 0, 130])
    assert idx.dtype == torch.int32 and idx.shape == (384,)
    assert (idx[:3] == 0).all() and (idx[3:128] == -1).all()
    assert (idx[128:258] == 2).all() and (idx[258:] == -1).all()


def test_compat_scale_layouts():
    n, k = 300, 640
    w = inputs.weights((2, n, k), True, "cpu", round_scale=True)
    x = inputs.activations((5, k), True, "cpu", round_scale=True)
    per_row = w[1].repeat_interleave(128, dim=-2)[:, :n]
    assert torch.equal(deep_gemm._weight_scales(per_row, n, k), w[1])
    assert torch.equal(deep_gemm._weight_scales(pack_ue8m0(per_row), n, k), w[1])
    assert torch.equal(deep_gemm._weight_scales(w[1], n, k), w[1])
    assert torch.equal(deep_gemm._act_scales(pack_ue8m0(x[1]), k), x[1])
    mn_major = x[1].T.contiguous().T
    assert deep_gemm._act_scales(mn_major, k) is mn_major


def test_compat_rejections():
    a8 = inputs.activations((64, K), True, "cpu")
    b8 = inputs.weights((N, K), True, "cpu")
    d = torch.empty(64, N, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="recipe"):
        deep_gemm.fp8_gemm_nt(a8, b8, d, recipe=(1, 1, 128))
    with pytest.raises(ValueError, match="c: accumulating"):
        deep_gemm.fp8_gemm_nt(a8, b8, d, c=d.float())
    assert deep_gemm.get_mk_alignment_for_contiguous_layout() == gemm.get_m_alignment() == 128

"""Low-latency dispatch / combine on CPU ranks, for every backend (see ep_backends.py)."""

import pytest

import ep_cases
from ep_backends import EP_BACKENDS
from ep_inputs import Scenario, spread

# (scenario, T): T is num_max_dispatch_tokens_per_rank.
CASES = {
    "bf16-2": (Scenario(tokens=[6, 3], hidden=256, num_experts=8, topk=3), 8),
    "bf16-full-and-empty-3": (Scenario(tokens=[4, 0, 4], hidden=128, num_experts=6, topk=2), 4),
    "topk1-4": (Scenario(tokens=[3, 5, 1, 2], hidden=128, num_experts=8, topk=1, empty=0.0), 5),
    "to-rank0-2": (Scenario(tokens=[5, 5], hidden=128, num_experts=8, topk=2, route="rank0"), 5),
    "all-empty-2": (Scenario(tokens=[3, 2], hidden=128, num_experts=4, topk=2, route="none"), 4),
}


@pytest.mark.parametrize("backend", EP_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("hook", [False, True])
def test_low_latency_bf16(clusters, backend, name, hook):
    sc, t = CASES[name]
    results = clusters(sc.world).run(ep_cases.check_low_latency, backend, sc, t, hook=hook)
    if sc.route == "rank0":
        assert results[1]["received"] == [0] * sc.experts_per_rank


@pytest.mark.parametrize("backend", EP_BACKENDS)
@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_low_latency_fp8(clusters, backend, round_scale, use_ue8m0):
    sc = Scenario(tokens=[5, 7], hidden=512, num_experts=8, topk=3, seed=4)
    clusters(2).run(ep_cases.check_low_latency, backend, sc, 8, True, round_scale, use_ue8m0)


@pytest.mark.parametrize("backend", EP_BACKENDS)
def test_low_latency_back_to_back(clusters, backend):
    clusters(2).run(ep_cases.check_low_latency_back_to_back, backend,
                    Scenario(tokens=[6, 4], hidden=128, num_experts=8, topk=3), 6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", EP_BACKENDS)
@pytest.mark.parametrize("tokens,hidden,topk", [(1, 2048, 1), (64, 4096, 4), (128, 7168, 8), (256, 7168, 8)])
def test_low_latency_gpu(gpu_cluster, backend, tokens, hidden, topk):
    sc = Scenario(tokens=spread([tokens, tokens // 2], gpu_cluster.world_size), hidden=hidden, num_experts=256,
                  topk=topk)
    gpu_cluster.run(ep_cases.check_low_latency, backend, sc, tokens, True, True, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", EP_BACKENDS)
def test_low_latency_back_to_back_gpu(gpu_cluster, backend):
    gpu_cluster.run(ep_cases.check_low_latency_back_to_back, backend,
                    Scenario(tokens=spread([128, 64], gpu_cluster.world_size), hidden=7168, num_experts=256,
                             topk=8), 128)

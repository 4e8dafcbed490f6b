"""High-throughput dispatch / combine on CPU ranks, for every backend (see ep_backends.py)."""

import dataclasses

import pytest

import ep_cases
from ep_backends import EP_BACKENDS
from ep_inputs import Scenario, spread

SCENARIOS = {
    "random-2": Scenario(tokens=[12, 7]),
    "random-4-one-rank-empty": Scenario(tokens=[9, 0, 13, 5], num_experts=16, topk=4),
    "all-to-rank0-4": Scenario(tokens=[6, 5, 0, 7], num_experts=8, topk=2, route="rank0"),
    "no-routes-2": Scenario(tokens=[4, 3], route="none"),
    "no-tokens-2": Scenario(tokens=[0, 0]),
    "fp8-hidden-384-3": Scenario(tokens=[5, 8, 3], hidden=384, num_experts=6, topk=2),
}


@pytest.mark.parametrize("backend", EP_BACKENDS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_dispatch_combine_rank_coded(clusters, backend, name):
    sc = SCENARIOS[name]
    results = clusters(sc.world).run(ep_cases.check_dispatch_combine, backend, sc)
    if sc.route == "rank0":
        assert [r["received"] for r in results][1:] == [0] * (sc.world - 1)


@pytest.mark.parametrize("backend", EP_BACKENDS)
@pytest.mark.parametrize("alignment", [4, 32])
def test_expert_alignment(clusters, backend, alignment):
    clusters(2).run(ep_cases.check_dispatch_combine, backend, Scenario(tokens=[11, 6], seed=3), alignment)


@pytest.mark.parametrize("backend", EP_BACKENDS)
@pytest.mark.parametrize("world", [2, 4])
def test_random_round_trip(clusters, backend, world):
    sc = Scenario(tokens=[17, 3, 0, 11][:world], hidden=128, num_experts=4 * world, topk=3)
    clusters(world).run(ep_cases.check_random_round_trip, backend, sc)


@pytest.mark.parametrize("backend", EP_BACKENDS)
def test_async_and_events(clusters, backend):
    clusters(2).run(ep_cases.check_async_and_events, backend, Scenario(tokens=[5, 9]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", EP_BACKENDS)
@pytest.mark.parametrize("name", ["random-2", "no-tokens-2"])
def test_dispatch_combine_gpu(gpu_cluster, backend, name):
    world = gpu_cluster.world_size
    sc = dataclasses.replace(SCENARIOS[name], tokens=spread(SCENARIOS[name].tokens, world), num_experts=4 * world)
    gpu_cluster.run(ep_cases.check_dispatch_combine, backend, sc)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", EP_BACKENDS)
def test_random_round_trip_gpu(gpu_cluster, backend):
    sc = Scenario(tokens=spread([4096, 3000], gpu_cluster.world_size), hidden=7168, num_experts=256, topk=8)
    gpu_cluster.run(ep_cases.check_random_round_trip, backend, sc, 2)

"""The symmetric heap and the timed flag waits, on simulated (CPU) and CUDA heaps."""

import pytest

import heap_cases


def _expected(rank, world):
    left = (rank + world - 1) % world
    return [float(left * 1000 + i) for i in range(16)]


@pytest.mark.parametrize("world", [2, 3])
def test_ring_exchange_through_the_heap(clusters, world):
    results = clusters(world).run(heap_cases.check_ring_exchange)
    for rank, seen in enumerate(results):
        assert seen == [_expected(rank, world)] * 3


@pytest.mark.parametrize("world", [2, 3])
def test_peer_views_write_into_the_neighbours_heap(clusters, world):
    for rank, got in enumerate(clusters(world).run(heap_cases.check_peer_views)):
        left = (rank + world - 1) % world
        assert got == [0] * 64 + [left + 1] * 32 + [0] * 160


def test_a_wait_that_gives_up_names_op_rank_and_peer(clusters):
    results = clusters(2).run(heap_cases.check_ring_exchange, 2, 0, 1.0)
    assert results[0][-1] == "silent"
    assert results[1][-1] == ("barrier: rank 1 waited more than 1 s for rank 0; "
                              "is rank 0 alive and calling barrier too?")


@pytest.mark.gpu
def test_ring_exchange_on_gpus(gpu_cluster):
    for rank, seen in enumerate(gpu_cluster.run(heap_cases.check_ring_exchange, 5)):
        assert seen == [_expected(rank, gpu_cluster.world_size)] * 5


@pytest.mark.gpu
def test_a_wait_that_gives_up_on_gpus(gpu_cluster):
    results = gpu_cluster.run(heap_cases.check_ring_exchange, 2, 0, 0.5)
    assert "rank 1 waited more than 0.5 s for rank 0" in results[1][-1]

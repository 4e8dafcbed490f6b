"""The benchmarks' device-side barrier, on the simulated heap."""

import time

import pytest
import torch
import torch.distributed as dist


def _pass_barrier(late_rank: int, delay_s: float, rounds: int) -> list[float]:
    """Every rank passes the barrier ``rounds`` times; ``late_rank`` arrives ``delay_s`` late each
    time. Returns the seconds each pass took on this rank."""
    from moekit.bench._flags import DeviceBarrier

    barrier = DeviceBarrier(dist.group.WORLD, torch.device("cpu"), timeout_s=60.0)
    took = []
    for _ in range(rounds):
        if dist.get_rank() == late_rank:
            time.sleep(delay_s)
        start = time.monotonic()
        barrier()
        took.append(time.monotonic() - start)
    return took


def _barrier_alone(timeout_s: float) -> str:
    """Only rank 0 reaches the barrier: it gives up after ``timeout_s`` and names the peer."""
    from moekit.bench._flags import DeviceBarrier

    barrier = DeviceBarrier(dist.group.WORLD, torch.device("cpu"), timeout_s=timeout_s)
    if dist.get_rank() != 0:
        return ""
    with pytest.raises(TimeoutError) as info:
        barrier()
    return str(info.value)


@pytest.mark.parametrize("world", [2, 3])
def test_no_rank_passes_before_the_last_arrives(clusters, world):
    delay, rounds = 1.0, 2
    took = clusters(world).run(_pass_barrier, world - 1, delay, rounds)
    for rank in range(world - 1):  # every early rank waited, in every round, for the late one
        assert all(t > 0.5 * delay for t in took[rank]), took
    assert all(t < delay for t in took[world - 1]), took  # the late rank found the others there


def test_a_missing_rank_is_named(clusters):
    # Under the interpreter the limit counts polls (about 1e4 a second), which run much slower.
    message = clusters(2).run(_barrier_alone, 0.02)[0]
    assert "barrier: rank 0 waited" in message and "for rank 1" in message

"""The multi-process launcher used by the tests and the demo."""

import time

import pytest
import torch.distributed as dist

from moekit.testing.cluster import Cluster, RankError


def _rank_and_size():
    return dist.get_rank(), dist.get_world_size()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise KeyError("rank one is unhappy")
    return "fine"


def _sleep(seconds):
    time.sleep(seconds)


def _sleep_on_rank_one(seconds):
    if dist.get_rank() == 1:
        _stuck_here(seconds)


def _stuck_here(seconds):
    time.sleep(seconds)


def test_runs_on_every_rank_and_reports_failures_by_rank():
    with Cluster(2, timeout_s=30) as cluster:
        assert cluster.run(_rank_and_size) == [(0, 2), (1, 2)]
        with pytest.raises(RankError, match="rank one is unhappy") as info:
            cluster.run(_fail_on_rank_one)
        assert list(info.value.errors) == [1]
        assert cluster.run(_rank_and_size)[1] == (1, 2)  # still usable after a failure


def test_a_rank_that_does_not_answer_is_named():
    cluster = Cluster(2, timeout_s=3)
    with pytest.raises(TimeoutError, match=r"_sleep: rank\(s\) \[0, 1\] did not answer within 3 s"):
        cluster.run(_sleep, 10)
    assert not cluster.alive
    # A run on the closed cluster says so at once instead of waiting for ranks that are gone.
    with pytest.raises(RuntimeError, match=r"_rank_and_size: this cluster's ranks are gone"):
        cluster.run(_rank_and_size)


def test_a_hung_rank_reports_where_it_hangs():
    cluster = Cluster(2, timeout_s=3)
    with pytest.raises(TimeoutError) as info:
        cluster.run(_sleep_on_rank_one, 10)
    message = str(info.value)
    assert "rank(s) [1] did not answer" in message and "--- rank 1 stack ---" in message
    assert "_stuck_here" in message and "rank 0 stack" not in message

"""The NVLink store benchmark's kernel: rows land where they should and the flags count tiles."""

import pytest
import torch

import nvlink_cases as cases


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scatter", [False, True])
def test_every_row_lands_at_its_destination_row(clusters, world, scatter):
    for rank, (landed, _) in enumerate(clusters(world).run(cases.check_push_rows, 3, 0, scatter, 16384)):
        sent = cases.source_rows((rank + world - 1) % world)
        expected = torch.empty_like(sent)
        expected[cases.row_order().long() if scatter else torch.arange(cases.ROWS)] = sent
        assert torch.equal(torch.tensor(landed, dtype=torch.int32), expected)


@pytest.mark.parametrize("flag_every, expected", [(0, [0, 0, 0]), (1, [2, 2, 1]), (2, [2, 2, 0]), (4, [0, 0, 0])])
def test_flags_count_the_tiles_pushed(clusters, flag_every, expected):
    # 16-word tiles hold 2 rows of 12 words: the 3 programs push 4, 4 and 2 rows, in 2, 2 and 1 tiles.
    for landed, flags in clusters(2).run(cases.check_push_rows, 3, flag_every, True, 32):
        assert flags == expected
        assert len(landed) == cases.ROWS


@pytest.mark.parametrize("args, named", [(["--row-bytes", "10"], "--row-bytes"), (["--rows", "0"], "--rows"),
                                         (["--programs", "0"], "--programs"), (["--flag-every", "-1"], "--flag-every"),
                                         (["--repeat", "0"], "--repeat")])
def test_bad_sizes_are_refused_before_any_gpu_work(args, named, capsys):
    from moekit.bench import nvlink

    with pytest.raises(SystemExit) as stop:
        nvlink.main(args)
    assert stop.value.code == 2
    assert named in capsys.readouterr().err


def test_local_copy_table_picks_each_ranks_view_of_the_traffic():
    from moekit.bench.nvlink import TRAFFIC, traffic_rows

    def timings(rank):  # rank r copies at (r + 1) * 100 GB/s alone, a quarter as fast under rank 0's pushes
        rate = {"none": 1.0, "rank 0": 0.25 if rank in (0, 1) else 1.0, "every rank": 0.5}
        return [dict(programs=p, pushers=who, us=1.0 / f, gbps=(rank + 1) * 100 * f * p / 24)
                for who, f in rate.items() for p in (24, 132)]

    rows = traffic_rows([timings(0), timings(1), timings(2)])
    assert [r["programs"] for r in rows] == [24] * 4 + [132] * 4
    by = {(r["programs"], r["traffic"]): r for r in rows}
    assert by[24, TRAFFIC["none"]]["gbps"] == 100 and by[24, TRAFFIC["none"]]["of_alone"] == 1.0
    assert by[24, TRAFFIC["out"]]["gbps"] == 25  # rank 0's own copy while it pushes
    assert by[24, TRAFFIC["in"]]["gbps"] == 50  # rank 1's copy while rank 0 pushes into it
    assert by[132, TRAFFIC["both"]]["of_alone"] == 0.5
    assert by[24, TRAFFIC["in"]]["of_alone"] == 0.25  # against rank 1's own rate alone

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

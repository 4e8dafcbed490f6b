"""The count exchange: every rank gets the rank prefix matrix and the summary its host reads."""

import itertools

import pytest

import notify_cases as cases


@pytest.mark.parametrize("num_tokens, num_experts", [([5, 0, 3], 6), ([4, 7], 0), ([0, 0], 4)])
def test_every_rank_gets_the_prefix_matrix_and_its_summary(clusters, num_tokens, num_experts):
    world, rounds = len(num_tokens), 3
    results = clusters(world).run(cases.check_exchange, num_tokens, num_experts, 2, rounds)
    e_loc = num_experts // world
    for r in range(rounds):
        table = [results[s][r]["row"] for s in range(world)]
        prefix = [list(itertools.accumulate(col)) for col in zip(*(row[:world] for row in table))]
        for rank in range(world):
            got = results[rank][r]
            assert got["epoch"] == r + 1
            assert got["prefix"] == [list(row) for row in zip(*prefix)]
            if r % 2:
                assert got["summary"] is None
                continue
            received = [sum(row[world + 1 + rank * e_loc + e] for row in table) for e in range(e_loc)]
            expected = [v for row in table for v in row[:world + 1]] + got["sent"] + received + got["range"]
            assert got["summary"] == expected

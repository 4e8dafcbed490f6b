"""The grouped GEMM kernel compiled for Hopper (sm_90a) on the CPU, no GPU needed: the FP8 "pair"
K loop must keep its odd MMA in flight, and no new candidate may make ptxas serialise the MMAs.

Runs moekit.gemm.compiled in a child process without TRITON_INTERPRET (which tests/conftest.py
sets for this one before triton is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import moekit
from moekit.gemm import config

_SCRIPT = """
import json, sys
from moekit.gemm import compiled, config
for layout, fp8, cfg in [tuple(x[:2]) + (config.TileConfig(**x[2]),) for x in json.loads(sys.argv[1])]:
    print(json.dumps(compiled.report(layout, fp8, cfg)), flush=True)
"""


def _nvidia_tools_present() -> bool:
    try:
        from triton import knobs
        return all(os.path.exists(tool.path) for tool in (knobs.nvidia.ptxas, knobs.nvidia.cuobjdump))
    except (ImportError, AttributeError):  # no NVIDIA backend in this Triton build
        return False


def _reports(cases: list[tuple[str, bool, config.TileConfig]]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.dirname(os.path.dirname(moekit.__file__))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    arg = json.dumps([(layout, fp8, vars(cfg)) for layout, fp8, cfg in cases])
    run = subprocess.run([sys.executable, "-c", _SCRIPT, arg], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not _nvidia_tools_present(), reason="Triton's NVIDIA backend tools (ptxas, cuobjdump) missing")
def test_new_fp8_candidates_compile_for_sm90():
    new = [c for rows in (32, 4096) for c in config.candidates(True, rows) if c.k_loop != "serial" or c.ctas_per_sm > 1]
    pair = config.TileConfig(128, 128, 128, num_warps=8, num_stages=3, k_loop="pair")
    assert pair in new
    cases = [("contiguous", True, c) for c in dict.fromkeys(new)]
    cases += [("masked", True, pair), ("dense", True, pair)]
    for row, (_, _, cfg) in zip(_reports(cases), cases, strict=True):
        assert not row["serialized"] and row["mma_groups"] == row["dots"], row
        assert row["dots_in_flight"] == (1 if cfg.k_loop == "pair" else 0), row
        assert row["fit_per_sm"] >= cfg.ctas_per_sm, row
        assert row["spill_bytes"] <= 32, row
        if cfg.block_m * cfg.block_n >= 128 * 128:
            assert row["spill_bytes"] == 0, row


@pytest.mark.skipif(not _nvidia_tools_present(), reason="Triton's NVIDIA backend tools (ptxas, cuobjdump) missing")
def test_flattened_bf16_candidate_fuses_its_loops():
    """Triton must fuse the flattened config's tile and K loops into one (the MMA then sits in a
    single loop) and store its full tiles with TMA, without spills; the nested candidate keeps two
    loops and stores row by row."""
    flat = config.candidates(False, 4096, contiguous=True)[0]
    nested = config.candidates(False, 4096)[0]
    assert flat.flatten and not nested.flatten
    flat_row, nested_row = _reports([("contiguous", False, flat), ("contiguous", False, nested)])
    assert flat_row["dot_loop_depth"] == 1 and nested_row["dot_loop_depth"] == 2, (flat_row, nested_row)
    assert flat_row["spill_bytes"] == 0 and not flat_row["serialized"], flat_row
    assert flat_row["tma_stores"] >= 1 and nested_row["tma_stores"] == 0, (flat_row, nested_row)

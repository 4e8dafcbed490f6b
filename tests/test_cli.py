"""The command line: demo (the check passes at 2 and 4 ranks), info, bench listing, bad arguments."""

import os
import subprocess
import sys

import pytest

# As a user runs it: kernels compiled, not interpreted (the test session interprets them).
USER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _moekit(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True, timeout=timeout,
                          env=USER_ENV)


DEMO_RUNS = [["--ranks", "4"], ["--ranks", "2"], ["--ranks", "2", "--mode", "low-latency", "--tokens", "16"]]


@pytest.mark.parametrize("args", DEMO_RUNS)
def test_demo_check_passes(args):
    proc = _moekit("demo", "--steps", "2", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check: PASS" in proc.stdout


def test_demo_refuses_experts_that_do_not_split():
    proc = _moekit("demo", "--ranks", "3", "--experts", "16")
    assert proc.returncode == 2 and "--experts: 16 experts cannot be split evenly over 3 ranks" in proc.stderr


def test_info_lists_versions_and_backends():
    proc = _moekit("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "EP backends", "gloo"):
        assert word in proc.stdout


def test_bench_lists_benchmarks_and_refuses_unknown_names():
    listing = _moekit("bench", "--help")
    assert listing.returncode == 0 and "eplb" in listing.stdout and "gemm" in listing.stdout
    unknown = _moekit("bench", "no-such-bench")
    assert unknown.returncode == 2 and "unknown benchmark 'no-such-bench'" in unknown.stdout


def test_no_command_prints_usage():
    proc = _moekit()
    assert proc.returncode == 2 and "usage" in proc.stderr

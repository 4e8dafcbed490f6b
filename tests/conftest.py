"""Shared test settings and fixtures.

GPU tests are marked ``gpu`` and deselected by default (see pyproject); run them on a GPU machine
with ``python -m pytest -m gpu``.
"""

import os

import pytest

# Keep NVLink multicast off in every process the tests start.
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})


def pytest_configure(config):
    """CPU runs interpret every Triton kernel; a GPU run (``-m gpu``) compiles them."""
    expr = config.getoption("markexpr") or ""
    if "gpu" not in expr or "not gpu" in expr:
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def clusters():
    """``clusters(n)``: a group of n CPU rank processes over gloo, shared by the whole session.

    Triton kernels run under the interpreter in them (TRITON_INTERPRET=1), on a simulated heap.
    """
    from moekit.testing.cluster import Cluster

    made = {}

    def get(world_size: int) -> Cluster:
        if world_size not in made or not made[world_size].alive:
            made[world_size] = Cluster(world_size, timeout_s=60, env={"TRITON_INTERPRET": "1"})
        return made[world_size]

    yield get
    for cluster in made.values():
        cluster.close(force=not cluster.alive)


@pytest.fixture(scope="session")
def _gpu_clusters():
    """The GPU tests' clusters: one at a time, a new one after a test lost its ranks."""
    import torch

    from moekit.testing.cluster import Cluster

    gpus = torch.cuda.device_count()
    ranks = int(os.environ.get("MOEKIT_GPU_RANKS", gpus))
    if gpus < 2 or not 2 <= ranks <= gpus:
        pytest.fail(f"GPU tests need at least 2 CUDA GPUs and 2 <= MOEKIT_GPU_RANKS <= {gpus}; "
                    f"found {gpus} GPUs, MOEKIT_GPU_RANKS={ranks}")
    made: list[Cluster] = []

    def get() -> Cluster:
        if not made or not made[-1].alive:
            made.append(Cluster(ranks, backend="nccl", timeout_s=float(os.environ.get("MOEKIT_GPU_TIMEOUT_S", 300))))
        return made[-1]

    yield get
    for cluster in made:
        cluster.close(force=not cluster.alive)


@pytest.fixture
def gpu_cluster(_gpu_clusters):
    """One rank per GPU over NCCL: every visible GPU, or ``MOEKIT_GPU_RANKS`` of them, shared by the
    GPU tests (a new one after a test lost its ranks, so one hang fails one test). A test that does
    not finish within ``MOEKIT_GPU_TIMEOUT_S`` (default 300) seconds fails with every stuck rank's
    stack."""
    return _gpu_clusters()

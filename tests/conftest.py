"""Shared test settings. GPU tests are marked ``gpu`` and deselected by default (see pyproject)."""

import os

# Keep NVLink multicast off in every process the tests start (see README, "GPUs").
for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")

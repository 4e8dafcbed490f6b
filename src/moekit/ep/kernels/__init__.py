"""Triton kernels of the EP backends, one file per kernel family, each kernel beside its launcher."""

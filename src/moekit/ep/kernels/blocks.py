"""Host-side arithmetic of launch block sizes, kept cheap: it runs on every EP call."""

from __future__ import annotations


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1): ``triton.next_power_of_2`` for n >= 1,
    which is a Triton constexpr function and costs microseconds per call from Python."""
    return 1 << max(n - 1, 0).bit_length()

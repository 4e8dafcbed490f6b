"""Benchmarks, one module per ``python -m moekit bench NAME`` (``low-latency`` -> ``low_latency.py``).

Each module exposes ``main(argv: list[str]) -> int``. Shared pieces: :mod:`moekit.bench.report`
(table, JSON, PNG) and :mod:`moekit.bench.timing` (medians of device-timed repeats); modules whose
names start with ``_`` are helpers, not benchmarks.
"""

from __future__ import annotations

import importlib
import pkgutil

_HELPERS = {"report", "timing"}


def available() -> list[str]:
    """Names of the benchmarks that ``python -m moekit bench`` accepts."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if m.name not in _HELPERS and not m.name.startswith("_")]
    return sorted(n.replace("_", "-") for n in names)


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m moekit bench NAME [options]\n\nbenchmarks: " + ", ".join(names))
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"unknown benchmark {name!r}; expected one of: {', '.join(names)}")
        return 2
    module = importlib.import_module(f"moekit.bench.{name.replace('-', '_')}")
    return int(module.main(argv[1:]) or 0)

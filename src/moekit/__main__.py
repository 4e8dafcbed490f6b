"""Command line: ``python -m moekit {demo, info, bench NAME}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m moekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="expert-parallel MoE layer forward on N ranks, checked against one process",
                   add_help=False)
    sub.add_parser("info", help="what this machine offers: GPUs, peer access, versions, backends",
                   add_help=False)
    sub.add_parser("bench", help="benchmarks: python -m moekit bench NAME --help", add_help=False)
    if not argv or argv[0] not in ("demo", "info", "bench"):
        parser.parse_args(argv)  # prints usage and exits
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from moekit.demo import main as demo_main
        return demo_main(rest)
    if command == "info":
        from moekit.info import main as info_main
        return info_main(rest)
    from moekit.bench import main as bench_main
    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())

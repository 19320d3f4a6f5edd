"""The ``shoal`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("which", choices=["envs"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "bench":
        from benchmarks import vector_envs  # noqa: F401  (filled in by the benchmark)
    return 0


if __name__ == "__main__":
    sys.exit(main())

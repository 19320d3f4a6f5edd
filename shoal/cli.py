"""The ``shoal`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Parallel and distributed RL.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    bench.add_argument("which", choices=["envs"], help="envs: vector-env steps/s vs other libraries")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see --help)")
    bench.set_defaults(run=_bench)
    return parser


def _bench(args: argparse.Namespace) -> int:
    from shoal.bench import vector_envs

    return vector_envs.main(args.args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The ``shoal`` command line: train, eval, plot, bench.

Every hyperparameter is a flag generated from the algorithm's config dataclass. Bad input
is refused with one line on stderr and exit code 2, before any env or process starts.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from shoal.algos import ALGORITHMS

_FLAGS: set[str] = set()  # every flag of every subcommand, for "did you mean" hints


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (the usage is one ``--help`` away)."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        _FLAGS.update(n for n in names if n.startswith("--"))
        return super().add_argument(*names, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            for word in message.split(":", 1)[1].split():
                near = difflib.get_close_matches(word.split("=")[0], sorted(_FLAGS), n=1)
                if word.startswith("--") and near:
                    message += f" (did you mean {near[0]}?)"
                    break
        sys.stderr.write(f"shoal: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from shoal.configio import add_config_flags

    parser = _Parser(prog="shoal", description="Parallel and distributed RL.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train an agent (writes a run directory)")
    algos = train.add_subparsers(dest="algo", required=True, parser_class=_Parser, metavar="{ppo,a2c,dqn}")
    for name, algo in ALGORITHMS.items():
        p = algos.add_parser(
            name, help=(algo.__module__ and sys.modules[algo.__module__].__doc__ or "").split("\n")[0]
        )
        p.add_argument("--config", help="YAML or TOML file of settings (flags override it)")
        p.add_argument(
            "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
        )
        p.add_argument("--quiet", action="store_true", help="no progress output")
        add_config_flags(p, algo.config_class)
        p.set_defaults(run=_train)

    ev = sub.add_parser("eval", help="greedy evaluation of a run's latest checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--episodes", type=int, default=20, help="episodes to evaluate (default: 20)")
    ev.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the run's)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=_eval)

    pl = sub.add_parser("plot", help="learning curves of one or more runs (PNG)")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("-o", "--out", help="output PNG (default: RUN_DIR/curves.png)")
    pl.set_defaults(run=_plot)

    bench = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    bench.add_argument(
        "which",
        choices=["envs", "sb3", "scaling"],
        help="envs: vector-env steps/s vs other libraries; sb3: PPO vs Stable-Baselines3; "
        "scaling: distributed strategies with 1 and 2 workers, bytes per update with compression",
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see --help)")
    bench.set_defaults(run=_bench)
    return parser


def _train(args: argparse.Namespace) -> int:
    from shoal import launch
    from shoal.configio import ConfigError, check_env_fits, load_config_file, resolve

    algo = ALGORITHMS[args.algo]
    fields = [f for f in vars(args) if f in algo.config_class.__dataclass_fields__]
    flags = {f: getattr(args, f) for f in fields}
    file_values: dict[str, Any] = {}
    resume = None
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there, is it a shoal run directory?")
        file_values = load_config_file(run_dir / "config.yaml")
        if file_values.get("algo", args.algo) != args.algo:
            raise ConfigError(f"--resume {run_dir}: that run trained {file_values['algo']}, not {args.algo}")
        flags["run_dir"] = str(run_dir)
        from shoal.checkpoint import latest

        resume = latest(run_dir / "checkpoints")
        if resume is None:
            raise ConfigError(f"--resume {run_dir}: the run has no checkpoint yet")
    if args.config:
        file_values.update(load_config_file(args.config))
    config = resolve(algo.config_class, algo.presets, file_values, flags)
    check_env_fits(args.algo, config)
    summary, run_dir = launch.train(args.algo, config, resume=resume, progress=not args.quiet)
    print(
        f"shoal: {args.algo} on {config.env}: mean greedy return {summary['mean_return']:.1f} "
        f"+- {summary['std_return']:.1f} over {summary['episodes']} episodes; run in {run_dir}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from shoal.agent import load
    from shoal.configio import ConfigError
    from shoal.trainer import evaluate

    if args.episodes < 1:
        raise ConfigError(f"--episodes must be a positive integer, got {args.episodes}")
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir} is not a directory")
    agent = load(args.run_dir)
    seed = agent.config.seed if args.seed is None else args.seed
    result = evaluate(agent.algorithm, agent.config.env, args.episodes, seed)
    if args.json:
        print(
            json.dumps(
                {"run_dir": str(args.run_dir), "env": agent.config.env, "algo": agent.algo_name, **result}
            )
        )
    else:
        print(
            f"{agent.algo_name} on {agent.config.env}: mean return {result['mean_return']:.2f} "
            f"+- {result['std_return']:.2f} over {result['episodes']} episodes"
        )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from shoal.plot import plot_runs

    out = args.out or str(Path(args.run_dirs[0]) / "curves.png")
    print(f"shoal: wrote {plot_runs(args.run_dirs, out)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.which == "sb3":
        from shoal.bench import sb3

        return sb3.main(args.args)
    if args.which == "scaling":
        from shoal.bench import scaling

        return scaling.main(args.args)
    from shoal.bench import vector_envs

    return vector_envs.main(args.args)


def main(argv: list[str] | None = None) -> int:
    from shoal.checkpoint import CheckpointError
    from shoal.configio import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        sys.stderr.write(f"shoal: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("shoal: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())

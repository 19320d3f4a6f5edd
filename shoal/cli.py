"""The ``shoal`` command line: train, eval, plot, bench.

Every hyperparameter is a flag generated from the algorithm's config dataclass. Bad input
is refused with one line on stderr and exit code 2, before any env or process starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from shoal.algos import ALGORITHMS
from shoal.config import MAX_EVAL_EPISODES, names_list

if TYPE_CHECKING:
    from shoal.training.trainer import StopRequest


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"shoal: error: {' '.join(message.split())}\n")
        sys.exit(2)


def _flags_of(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(s for a in parser._actions for s in a.option_strings if s.startswith("--"))


def _nearest(name: str, flags: list[str]) -> str | None:
    """The flag meant: an abbreviation by initials (--lr: --learning-rate), else the closest."""
    flags = [f for f in flags if f != "--help"]
    word = name.removeprefix("--").replace("_", "-")
    by_initials = [f for f in flags if "".join(p[0] for p in f[2:].split("-")) == word]
    if len(word) >= 2 and by_initials:
        return by_initials[0]
    near = difflib.get_close_matches("--" + word, flags, n=1)
    return near[0] if near else None


def _unknown_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> NoReturn:
    """Refuse unknown arguments, naming the flag meant: of this command, or of another algorithm."""
    own = _flags_of(_subparser(parser, args))
    message = f"unrecognized arguments: {' '.join(extra)}"
    for word in extra:
        name = word.split("=")[0]
        if not name.startswith("--"):
            continue
        field = name[2:].replace("-", "_")
        owners = [n for n, a in ALGORITHMS.items() if field in a.config_class.__dataclass_fields__]
        near = _nearest(name, own)
        if owners and getattr(args, "algo", None):
            message += f" ({name} is a setting of {names_list(sorted(owners))} only)"
        elif near:
            message += f" (did you mean {near}?)"
        else:
            continue
        break
    parser.error(message)


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command's own parser, e.g. that of ``shoal train ppo``."""
    for key in ("command", "algo"):
        choice = getattr(args, key, None)
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if choice is None or sub is None or choice not in sub.choices:
            break
        parser = sub.choices[choice]
    return parser


def _env_in(argv: list[str]) -> str | None:
    """The ``--env`` given, if any: ``--help`` shows the defaults that will run for it."""
    for i, word in enumerate(argv):
        if word == "--env" and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith("--env="):
            return word.split("=", 1)[1]
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``shoal`` parser; with ``argv``, train's help shows the defaults for its ``--env``."""
    from shoal.configio import add_config_flags, preset_for

    parser = _Parser(prog="shoal", description="Parallel and distributed RL.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{train,eval,plot,bench}")

    train = sub.add_parser("train", help="train an agent (writes a run directory)")
    names = ",".join(ALGORITHMS)
    algos = train.add_subparsers(dest="algo", parser_class=_Parser, metavar=f"{{{names}}}")
    env = _env_in(argv or [])
    for name, algo in ALGORITHMS.items():
        run_env = env or algo.config_class.env
        shipped = ", ".join(algo.presets) or "none"
        preset = f"its {run_env} preset" if preset_for(algo.presets, run_env) else f"no preset for {run_env}"
        p = algos.add_parser(
            name,
            help=(algo.__module__ and sys.modules[algo.__module__].__doc__ or "").split("\n")[0],
            usage=f"shoal train {name} [--env ENV] [--config FILE] [--resume RUN_DIR] [--quiet]"
            " [--SETTING VALUE ...]",
            description=(
                f"Train {name} on --env (default {algo.config_class.env}). The defaults below are the"
                f" values that will run for --env {run_env}: {name}'s dataclass defaults, then its"
                " defaults for the env's action space (Box actions, i.e. continuous control, get their"
                f" own: each is marked 'for Box actions', with what other spaces get), then {preset}"
                f" (marked '{run_env} preset'). Presets ship for: {shipped}. Precedence: defaults <"
                " action-space defaults < preset < --config FILE < flags."
            ),
        )
        p.add_argument("--config", help="YAML or TOML file of settings (flags override it)")
        p.add_argument(
            "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
        )
        p.add_argument("--quiet", action="store_true", help="no progress output")
        add_config_flags(p, algo.config_class, algo.presets, run_env)
        p.set_defaults(run=_train)

    ev = sub.add_parser("eval", help="greedy evaluation of a run's latest (or best) checkpoint")
    ev.add_argument("run_dir")
    ev.add_argument(
        "--episodes",
        type=lambda text: _flag_int(text, "--episodes"),
        default=20,
        help=f"episodes to evaluate, at most {MAX_EVAL_EPISODES:,} (default: 20)",
    )
    ev.add_argument(
        "--seed",
        type=lambda text: _flag_int(text, "--seed"),
        default=None,
        help="evaluation seed (default: the run's)",
    )
    ev.add_argument(
        "--device",
        default=None,
        help="device to evaluate on: auto|cpu|cuda|cuda:N (default: the run's, or the CPU without a GPU)",
    )
    ev.add_argument(
        "--best",
        action="store_true",
        help="evaluate the run's best checkpoint (kept by --eval-every) instead of its latest",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=_eval)

    pl = sub.add_parser("plot", help="learning curves of one or more runs (PNG)")
    pl.add_argument("run_dirs", nargs="+")
    pl.add_argument("-o", "--out", help="output PNG (default: RUN_DIR/curves.png)")
    pl.set_defaults(run=_plot)

    bench = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    bench.add_argument(
        "which",
        choices=["envs", "sb3", "scaling", "zoo", "atari"],
        help="envs: vector-env steps/s vs other libraries; sb3: PPO vs Stable-Baselines3; "
        "scaling: distributed strategies with 1 and 2 workers, bytes per update with compression; "
        "zoo: shoal vs Stable-Baselines3 on MuJoCo and Box2D (PPO, SAC, TD3) and 1 vs 2 workers; "
        "atari: Atari frames/s of vector envs and of PPO training, shoal vs gymnasium, SB3, EnvPool",
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see --help)")
    bench.set_defaults(run=_bench)
    return parser


def _flag_int(text: str, name: str) -> int:
    from shoal.configio import _parse

    try:
        return _parse(int, text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} for {name}: give an integer") from None


def _train(args: argparse.Namespace) -> int:
    from shoal import launch
    from shoal.configio import ConfigError, check_env_fits, load_config_file, resolve, show

    algo = ALGORITHMS[args.algo]
    fields = [f for f in vars(args) if f in algo.config_class.__dataclass_fields__]
    flags = {f: getattr(args, f) for f in fields}
    file_values: dict[str, Any] = {}
    saved: dict[str, Any] = {}
    resume = None
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there, is it a shoal run directory?")
        file_values = saved = load_config_file(run_dir / "config.yaml")
        if file_values.get("algo", args.algo) != args.algo:
            raise ConfigError(
                f"--resume {run_dir}: that run trained {show(file_values['algo'])}, not {args.algo}"
            )
        flags["run_dir"] = str(run_dir)
        from shoal.run.checkpoint import latest
        from shoal.run.rundir import allow_restart

        resume = latest(run_dir / "checkpoints")
        if resume is None:  # stopped (or killed) before its first checkpoint: nothing to continue from
            sys.stderr.write(f"shoal: --resume {run_dir}: no checkpoint yet, starting the run over\n")
            allow_restart(run_dir)
    if args.config:
        from_file = load_config_file(args.config)
        if from_file.get("algo", args.algo) != args.algo:
            raise ConfigError(
                f"config file {args.config} is for {show(from_file['algo'])}, not {args.algo}:"
                f" use `shoal train {from_file['algo']}` or drop its algo line"
            )
        file_values = {**file_values, **from_file}
    config = resolve(algo.config_class, algo.presets, file_values, flags)
    frozen = [f.name for f in dataclasses.fields(config) if f.metadata.get("frozen")]  # shape the tensors
    for name in frozen:
        value = getattr(config, name, None)
        was = saved.get(name, value)
        if isinstance(was, list):
            was = tuple(was)
        if resume is not None and was != value:
            raise ConfigError(
                f"--resume {args.resume}: {name} {show(value)} differs from the run's {show(was)},"
                f" which its checkpoint needs; drop --{name.replace('_', '-')}"
            )
    if resume is not None:  # a checkpoint is data: checked like flags before anything uses it
        from shoal.agent import read_checkpoint

        read_checkpoint(resume, env=config.env)
    check_env_fits(args.algo, config)
    from shoal.training.trainer import StopRequest

    with _graceful_stop(StopRequest()) as stop:  # on mp and ray the supervisor passes it to every rank
        summary, run_dir = launch.train(args.algo, config, resume=resume, progress=not args.quiet, stop=stop)
    why = stop.signal
    if why:
        from shoal.run.checkpoint import latest

        saved_to = latest(Path(run_dir) / "checkpoints")
        sys.stdout.flush()
        sys.stderr.write(
            f"shoal: interrupted ({why}): checkpoint saved to {saved_to};"
            f" resume with: shoal train {args.algo} --resume {run_dir}\n"
        )
        return 128 + signal.Signals[why]
    from shoal.agent import result_line

    print(result_line(args.algo, config.env, summary, run_dir))
    return 0


class Interrupted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM while a stop was already under way: leave now."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _graceful_stop(stop: StopRequest) -> Iterator[StopRequest]:
    """SIGINT and SIGTERM ask the training loop to stop (it checkpoints and closes its envs).

    A second signal raises :class:`Interrupted` wherever the loop is, e.g. mid-save, which
    is safe: checkpoint files are written to a temporary name and renamed. Where it lands in
    a finalizer (a ``__del__``, a weakref callback), Python only reports it as "Exception
    ignored" and runs on: the report is silenced, and the stop raises it once the loop has
    returned. Outside the main thread no handler can be installed, and nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    me = os.getpid()
    swallowed: list[int] = []  # second signals that a finalizer swallowed

    def handle(signum: int, frame: Any) -> None:
        if os.getpid() != me:  # a forked child (an env worker) that has not set its own handlers yet
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stop:
            raise Interrupted(signum)
        stop.request(signal.Signals(signum).name)

    report_unraisable = sys.unraisablehook

    def unraisable(event: Any) -> None:
        if isinstance(event.exc_value, Interrupted):  # raised again below
            swallowed.append(event.exc_value.signum)
        else:
            report_unraisable(event)

    stop.clear()
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.unraisablehook = unraisable
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = report_unraisable
    if swallowed:  # the loop ran on to its end
        raise Interrupted(swallowed[0])


def _eval(args: argparse.Namespace) -> int:
    from shoal.agent import load, result_line
    from shoal.configio import ConfigError
    from shoal.training.trainer import env_of, evaluate

    if not 1 <= args.episodes <= MAX_EVAL_EPISODES:
        raise ConfigError(
            f"--episodes must be an integer in [1, {MAX_EVAL_EPISODES:,}], got {args.episodes:,}"
        )
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir} is not a directory")
    agent = load(args.run_dir, device=args.device, best=args.best)
    seed = agent.config.seed if args.seed is None else args.seed
    result = evaluate(agent.algorithm, env_of(agent.config, training=False), args.episodes, seed)
    if args.json:
        run_dir = str(Path(args.run_dir).absolute())
        print(json.dumps({"run_dir": run_dir, "env": agent.config.env, "algo": agent.algo_name, **result}))
    else:
        print(result_line(agent.algo_name, agent.config.env, result))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from shoal.run.plot import plot_runs

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
    if args.which == "zoo":
        from shoal.bench import zoo

        return zoo.main(args.args)
    if args.which == "atari":
        from shoal.bench import atari

        return atari.main(args.args)
    from shoal.bench import vector_envs

    return vector_envs.main(args.args)


def _after_signal(code: int, program: bool) -> int:
    """The exit code of a run a signal stopped; the program leaves at once.

    Everything is saved and closed by now. Python's teardown (torch's finalizers) takes most
    of a second, with SIGINT back at its default: another Ctrl-C there would kill the process
    mid-teardown, or print a traceback. In-process callers (``main(argv)``) just get the code.
    """
    if program:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


@contextlib.contextmanager
def _logging(quiet: bool) -> Iterator[None]:
    """shoal's log lines on stderr ("shoal: make_vec ... picked 'sync'"), warnings only with --quiet.

    The library installs no handler (a program using shoal decides); the CLI is a program.
    """
    log = logging.getLogger("shoal")
    if log.handlers:  # the user's (or an embedding program's) logging setup wins
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("shoal: %(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def main(argv: list[str] | None = None) -> int:
    from shoal.configio import ConfigError
    from shoal.envs.make import EnvBrokenError
    from shoal.guards import NonFiniteError
    from shoal.launch import TrainingFailed
    from shoal.run.checkpoint import CheckpointError, RunWriteError
    from shoal.training.trainer import RestartLimitError

    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words)
    args, extra = parser.parse_known_args(words)
    if getattr(args, "run", None) is None:  # `shoal` or `shoal train` alone: what can follow
        _subparser(parser, args).print_help()
        return 2
    if extra:
        _unknown_flags(parser, args, extra)
    try:
        with _logging(quiet=getattr(args, "quiet", False)):
            code = args.run(args)
        return _after_signal(code, argv is None) if code > 128 else code
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        sys.stderr.write(f"shoal: error: {' '.join(str(e).split())}\n")  # one line, whatever it holds
        return 2
    except (NonFiniteError, RestartLimitError, EnvBrokenError, TrainingFailed, RunWriteError) as e:
        # A failure at run time (exit 1), not bad input: says where, and what is kept.
        sys.stderr.write(f"shoal: error: {e}\n")
        return 1
    except Interrupted as e:  # a second signal while stopping
        name = signal.Signals(e.signum).name
        sys.stderr.write(
            f"shoal: interrupted again ({name}): stopped at once; checkpoints written are whole\n"
        )
        return _after_signal(128 + e.signum, argv is None)
    except KeyboardInterrupt:  # before or outside training (no handler installed)
        sys.stderr.write("shoal: interrupted (SIGINT)\n")
        return _after_signal(128 + signal.SIGINT, argv is None)


if __name__ == "__main__":
    sys.exit(main())

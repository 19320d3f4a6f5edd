"""Config dataclasses <-> command-line flags and YAML/TOML files, validated up front.

Precedence: the dataclass defaults < the algorithm's preset for the env < a config file <
flags. Every problem is reported as ONE actionable line (``ConfigError``) before any env,
worker or process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import numbers
import os
import reprlib
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from shoal.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """Invalid configuration; its message is one line a user can act on."""


class UnknownSettingError(ConfigError, TypeError):
    """A keyword that is no setting: a TypeError too, as Python raises for unknown keywords."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional) of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse(tp: Any, text: str) -> Any:
    base, optional = _base(tp)
    if optional and text.lower() in ("none", "null", ""):
        return None
    if typing.get_origin(base) is tuple:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    if base is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return base(text)


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type[TrainConfig], skip: tuple[str, ...] = ()
) -> None:
    """One ``--kebab-case`` flag per config field; values stay unset unless given."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if base is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            metavar = "N,N" if typing.get_origin(base) is tuple else base.__name__.upper()
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                metavar=metavar,
                help=help_text,
                type=lambda text, tp=hints[f.name], name=f.name: _flag_value(tp, text, name),
            )


def _flag_value(tp: Any, text: str, name: str) -> Any:
    try:
        return _parse(tp, text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} for {name}") from None


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few settings; never read a device or a huge file whole


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or TOML (.toml) file, as a flat mapping."""
    import yaml

    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    try:
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES >> 20} MB: is it a config file?")
        text = raw.decode("utf-8-sig")
        data = yaml.safe_load(text) if path.suffix != ".toml" else tomllib.loads(text)
    except ConfigError:
        raise
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        if isinstance(e, yaml.MarkedYAMLError) and mark is not None:  # several lines: keep what and where
            first = f"{e.problem or e.context} (line {mark.line + 1}, column {mark.column + 1})"
        else:
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"cannot read config file {path}: {first}") from None
    if data is None:  # an empty file, or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold key: value settings, got {type(data).__name__}")
    return data


def show(value: Any) -> str:
    """A value for an error message: its repr, cut short (a file can hold anything)."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 2


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _kind(base: Any) -> str:
    """How a field's type reads in an error message."""
    if typing.get_origin(base) is tuple:
        return "a list of integers like [64, 64]"
    return {bool: "true or false", int: "an int", float: "a float", str: "a str"}.get(base, str(base))


def coerce(cls: type, name: str, value: Any, *, text: bool = True) -> Any:
    """A value from a config file (or, with ``text=False``, a Python keyword) as the field's type.

    Numbers and lists convert to the field's type (an int where a float goes, a list of ints
    for ``hidden``); with ``text``, so do strings, as on the command line, because YAML reads
    ``1e-3`` as a string. Anything else is refused with one line naming the field.
    """
    tp = _field_types(cls)[name]
    base, optional = _base(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty: give {_kind(base)}")
    bad = ConfigError(f"{name} must be {_kind(base)}, got {show(value)}")
    if text and isinstance(value, str) and base is not str:
        try:
            return _parse(tp, value)
        except ValueError:
            raise bad from None
    if typing.get_origin(base) is tuple:
        if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
            return tuple(int(v) for v in value)
        raise bad
    if base is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise bad
    if base is float and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    if base is int and _is_int(value):
        return int(value)
    if base is int and isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
        raise ConfigError(f"{name} must be an int, got {value!r} (write {int(value)})")
    if base is str and isinstance(value, str):
        return value
    raise bad


def check_types(config: TrainConfig) -> None:
    """Every field holds its declared type (a config built in Python may hold anything)."""
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        base, optional = _base(hints[f.name])
        if value is None and optional:
            continue
        if typing.get_origin(base) is tuple:
            ok = isinstance(value, (tuple, list)) and all(_is_int(v) for v in value)
        elif base is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            if ok and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        elif base is int:
            ok = _is_int(value)
        else:
            ok = isinstance(value, base)
        if not ok:
            raise ConfigError(f"{f.name} must be {_kind(base)}, got {show(value)}")


def unknown_hint(cls: type, key: Any) -> str:
    """ "; it is a setting of dqn" or "; did you mean 'gamma'?" for a name ``cls`` lacks."""
    from shoal.algos import ALGORITHMS

    fields = {n: a.config_class.__dataclass_fields__ for n, a in ALGORITHMS.items()}
    owners = [n for n, names in fields.items() if isinstance(key, str) and key in names]
    if owners:
        return f"; it is a setting of {' and '.join(owners)} only"
    if key in fields:
        return f"; settings go at the top level, not under {key!r}"
    near = difflib.get_close_matches(str(key), [f.name for f in dataclasses.fields(cls)], n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def check_keys(cls: type, keys: Any, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in keys:
        if key not in names:
            raise ConfigError(f"unknown setting {show(key)} in {where}{unknown_hint(cls, key)}")


def resolve(
    cls: type[TrainConfig],
    presets: dict[str, dict[str, Any]],
    file_values: dict[str, Any],
    flag_values: dict[str, Any],
) -> TrainConfig:
    """Defaults < preset for the env < file < flags, then validated."""
    file_values = {k: v for k, v in file_values.items() if k != "algo"}  # a saved config.yaml names it
    check_keys(cls, file_values, "the config file")
    file_values = {k: coerce(cls, k, v) for k, v in file_values.items()}
    flags = {k: v for k, v in flag_values.items() if v is not None}
    env = next((v for v in (flags.get("env"), file_values.get("env")) if v is not None), cls.env)
    values = dict(presets.get(env, {}))
    values.update(file_values)
    values.update(flags)
    values["env"] = env
    config = cls(**values)
    validate(config, explicit=flags)
    return config


# Upper bounds that keep a typo from exhausting the machine (memory is checked against what
# the env needs in ``check_env_fits``).
MAX_INT = 10**15
MAX_NUM_ENVS = 10_000  # each env is a Python object stepped on this machine
MAX_ENV_WORKERS = 256
MAX_TORCH_THREADS = 256  # torch crashes on absurd thread counts
POSITIVE = (
    "num_workers",
    "sync_every",
    "num_envs",
    "total_steps",
    "num_steps",
    "num_minibatches",
    "update_epochs",
    "batch_size",
    "buffer_size",
    "train_freq",
    "gradient_steps",
    "target_update_interval",
    "n_step",
    "eval_episodes",
    "log_every",
    "torch_threads",
    "env_workers",
)
NON_NEGATIVE = (
    "learning_starts",
    "checkpoint_every",
    "keep_checkpoints",
    "seed",
    "max_restarts",
    "max_policy_lag",
    "ent_coef",
    "vf_coef",
    "step_timeout",
    "ray_cpus_per_worker",
    "ray_gpus_per_worker",
)
GREATER_THAN_ZERO = ("learning_rate", "clip_coef", "max_grad_norm", "rms_eps", "target_kl")
UNIT_INTERVAL = ("gae_lambda", "exploration_initial_eps", "exploration_final_eps", "exploration_fraction")
OPEN_UNIT = ("gamma", "tau", "topk_ratio")  # (0, 1]
# Settings that only mean something with another setting: (name, needed, where it applies).
ONLY_WITH: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("ps_mode", lambda c: c.strategy == "param-server", "--strategy param-server (a3c is always async)"),
    ("sync_every", lambda c: c.strategy == "param-avg", "--strategy param-avg"),
    ("max_policy_lag", lambda c: c.strategy == "a3c", "--strategy a3c (param-server applies every gradient)"),
    ("topk_ratio", lambda c: c.compress == "topk", "--compress topk"),
    ("ray_cpus_per_worker", lambda c: c.backend == "ray", "--backend ray"),
    ("ray_gpus_per_worker", lambda c: c.backend == "ray", "--backend ray"),
    ("ray_address", lambda c: c.backend == "ray", "--backend ray"),
    ("env_workers", lambda c: c.vectorization != "sync", "--vectorization process (or auto)"),
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(
    config: TrainConfig, algo: str | None = None, *, explicit: Iterable[str] = (), registered: bool = True
) -> None:
    """Raise ConfigError for the first problem found; cheap checks before the env probe.

    ``explicit`` names the settings the user gave (flags, keywords): a setting that only
    applies with another one (``--sync-every`` without ``--strategy param-avg``) is refused
    when given, or when it differs from its default (a config file may list every default,
    as a saved ``config.yaml`` does). ``registered=False``: the env is a callable, not an id.
    """
    check_types(config)
    c, explicit = config, set(explicit)
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if _is_int(value) and value > MAX_INT:
            raise ConfigError(f"{f.name} must be at most {MAX_INT:.0e}, got {value}")
    for name in POSITIVE:
        value = getattr(c, name, 1)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name in NON_NEGATIVE:
        if getattr(c, name, 0) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(c, name)!r}")
    for name in GREATER_THAN_ZERO:
        value = getattr(c, name, None)
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")
    for name in UNIT_INTERVAL:
        value = getattr(c, name, 0.5)
        if not 0 <= value <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    for name in OPEN_UNIT:
        value = getattr(c, name, 0.5)
        if not 0 < value <= 1:
            raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    if not 0 <= getattr(c, "rms_alpha", 0.5) < 1:
        raise ConfigError(f"rms_alpha must be in [0, 1), got {c.rms_alpha!r}")
    if not -20 <= getattr(c, "log_std_init", 0.0) <= 20:
        raise ConfigError(f"log_std_init must be in [-20, 20] (the std is its exp), got {c.log_std_init!r}")
    if any(width < 1 for width in getattr(c, "hidden", ())):
        raise ConfigError(f"hidden layer sizes must be positive integers, got {list(c.hidden)}")
    if c.num_envs > MAX_NUM_ENVS:
        raise ConfigError(
            f"num_envs must be at most {MAX_NUM_ENVS:,} (each env runs on this machine), got {c.num_envs:,}"
        )
    if c.env_workers is not None and c.env_workers > min(c.num_envs, MAX_ENV_WORKERS):
        raise ConfigError(
            f"env_workers {c.env_workers} is more than num_envs {c.num_envs} (or {MAX_ENV_WORKERS}):"
            " each env worker steps at least one env; lower --env-workers"
        )
    if c.torch_threads > MAX_TORCH_THREADS:
        raise ConfigError(f"torch_threads must be at most {MAX_TORCH_THREADS}, got {c.torch_threads}")
    if c.seed >= 2**63:
        raise ConfigError(f"seed must be below 2**63, got {c.seed}")
    if hasattr(c, "num_minibatches") and c.num_minibatches > c.num_steps * c.num_envs:
        raise ConfigError(
            f"num_minibatches {c.num_minibatches} is more than the {c.num_steps * c.num_envs} transitions"
            f" of a rollout (num_steps {c.num_steps} x num_envs {c.num_envs}); lower --num-minibatches"
        )
    if hasattr(c, "buffer_size") and c.batch_size > c.buffer_size:
        raise ConfigError(
            f"batch_size {c.batch_size} is more than buffer_size {c.buffer_size}; lower --batch-size"
        )
    _check_run_dir(c.run_dir)

    from shoal.distributed.names import BACKENDS, STRATEGIES

    for name, choices in (
        ("backend", BACKENDS),
        ("strategy", STRATEGIES),
        ("ps_mode", ("sync", "async")),
        ("vectorization", ("auto", "sync", "process")),
        ("on_env_error", ("restart", "raise")),
        ("nan_policy", ("raise", "skip")),
    ):
        if getattr(c, name) not in choices:
            allowed = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
            raise ConfigError(f"{name} must be {allowed}, got {show(getattr(c, name))}")
    from shoal.distributed.compress import MODES

    if c.compress not in MODES:
        raise ConfigError(f"compress must be one of {', '.join(MODES)}, got {show(c.compress)}")
    if c.device not in ("auto", "cpu", "cuda") and not (
        c.device.startswith("cuda:") and c.device[5:].isdigit()
    ):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {show(c.device)}")
    if c.backend == "local" and c.num_workers > 1:
        raise ConfigError(f"num_workers {c.num_workers} needs --backend mp or ray (local runs one learner)")
    if c.backend == "local" and c.strategy != "sync":
        raise ConfigError(
            f"strategy {c.strategy} needs several workers: add --backend mp (or ray) --num-workers 2"
        )
    if c.backend == "local" and c.compress != "none":
        raise ConfigError(
            f"compress {c.compress} is for several workers (--backend mp or ray): a local run sends nothing"
        )
    cores = os.cpu_count() or 1
    if c.backend == "mp" and c.num_workers > 4 * cores:
        raise ConfigError(
            f"num_workers {c.num_workers} on --backend mp starts that many processes on this machine's"
            f" {cores} cores; use at most {4 * cores}, or --backend ray for a cluster"
        )
    fields = type(c).__dataclass_fields__
    for name, applies, where in ONLY_WITH:
        if not applies(c) and (name in explicit or getattr(c, name) != fields[name].default):
            raise ConfigError(f"{name} is for {where}; drop {_flag(name)}")
    if c.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("backend ray needs Ray: pip install 'shoal[ray]' (or use --backend mp)")
    local_gpus = c.backend == "ray" and c.ray_gpus_per_worker > 0 and not c.ray_address
    if c.device.startswith("cuda") or local_gpus:
        import torch

        if not torch.cuda.is_available():
            if c.device.startswith("cuda"):
                asked = f"device {c.device!r} was requested"
                raise ConfigError(f"{asked} but no CUDA GPU is available; use --device cpu or auto")
            raise ConfigError(
                f"ray_gpus_per_worker {c.ray_gpus_per_worker:g} asks for GPUs, but the local Ray started here"
                " would have none; set it to 0, or join a cluster with GPUs via --ray-address"
            )
    if registered and c.env not in gym.registry:
        near = difflib.get_close_matches(c.env, list(gym.registry), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown env id {show(c.env)}{hint}")


def _check_run_dir(run_dir: str | None) -> None:
    """The run directory can be made and written (a PermissionError mid-start is a traceback)."""
    if run_dir is None:
        return
    if not run_dir.strip() or "\0" in run_dir:
        raise ConfigError(f"run_dir must be a directory path, got {show(run_dir)}")
    path = Path(run_dir).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir {run_dir} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {run_dir} cannot be created: {existing} is not writable")


def _available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _nbytes(space: spaces.Space) -> int:
    """Bytes of one sample of ``space`` as the buffers store it (8 for a Discrete)."""
    shape = space.shape or ()
    itemsize = np.dtype(space.dtype).itemsize if space.dtype is not None else 8
    return int(np.prod(shape, dtype=np.float64)) * itemsize


def memory_needed(
    algo: str, config: TrainConfig, obs_space: spaces.Space, action_space: spaces.Space
) -> dict[str, float]:
    """Rough bytes one learner allocates, by the setting that sizes it."""
    c = config
    obs, act = _nbytes(obs_space), _nbytes(action_space)
    inputs = float(np.prod(obs_space.shape or (1,), dtype=np.float64))
    widths = [inputs, *getattr(c, "hidden", ())]
    weights = sum(a * b for a, b in zip(widths, widths[1:])) + widths[-1] * 64
    if algo == "dqn":
        # online + target network, gradient, two Adam moments; a batch's activations
        need = {
            "buffer_size": c.buffer_size * (2.0 * obs + 8 + 8),
            "hidden": 5 * 4 * weights + 4 * 4 * c.batch_size * sum(widths),
        }
    else:
        rows = c.num_steps * c.num_envs
        need = {
            "num_steps": rows * (obs + act + 4 * 8.0),
            "hidden": 2 * 4 * 4 * weights + 2 * 4 * 4 * rows * sum(widths),  # actor and critic
        }
    return need


def check_env_fits(algo: str, config: TrainConfig, env_fn: Callable[..., gym.Env] | None = None) -> None:
    """Algorithm/env compatibility and memory, from the env's spaces (one env is made and closed)."""
    try:  # a missing optional dependency (box2d, mujoco) or a broken constructor
        probe = env_fn() if env_fn is not None else gym.make(config.env)
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"cannot make env {config.env}: {type(e).__name__}: {first}") from None
    try:
        obs_space, action_space = probe.observation_space, probe.action_space
    finally:
        probe.close()
    if algo == "dqn" and not isinstance(action_space, spaces.Discrete):
        raise ConfigError(f"dqn needs discrete actions but {config.env} has {action_space}; use ppo or a2c")
    if not isinstance(action_space, (spaces.Discrete, spaces.Box)):
        raise ConfigError(f"{algo} supports Discrete and Box action spaces, {config.env} has {action_space}")
    available = _available_memory()
    if available is None:
        return
    need = memory_needed(algo, config, obs_space, action_space)
    workers = config.num_workers if config.backend == "mp" else 1  # every mp worker is on this machine
    total = workers * sum(need.values())
    if total > available:
        biggest = max(need, key=need.__getitem__)
        lower = "--num-steps or --num-envs" if biggest == "num_steps" else _flag(biggest)
        raise ConfigError(
            f"this config needs about {_size(total)} of memory ({_size(workers * need[biggest])} sized by"
            f" {biggest}) but this machine has {_size(available)} available; lower {lower}"
        )


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"

"""Config dataclasses <-> command-line flags and YAML/TOML files, validated up front.

Precedence: the dataclass defaults < the algorithm's preset for the env < a config file <
flags. Every problem is reported as ONE actionable line (``ConfigError``) before any env,
worker or process starts. Nothing here names an algorithm or one of its fields: each
config class declares its constraints and validates itself (``shoal.config``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import fnmatch
import functools
import numbers
import os
import sys
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from shoal.config import (
    GROUPS,
    MAX_INT,
    ConfigError,
    TrainConfig,
    base_type,
    check_run_dir,
    flag,
    is_int,
    kind,
    names_list,
    show,
)
from shoal.envs.atari import ensure_registered, env_source

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class UnknownSettingError(ConfigError, TypeError):
    """A keyword that is no setting: a TypeError too, as Python raises for unknown keywords."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(tp: Any, text: str) -> Any:
    base, optional = base_type(tp)
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
    if base is int:
        try:
            return int(text)
        except ValueError:
            number = float(text)  # 1e5 is a whole number, as in Python
            if number.is_integer() and abs(number) < 1e18:
                return int(number)
            raise
    return base(text)


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type[TrainConfig],
    presets: dict[str, dict[str, Any]] | None = None,
    env: str | None = None,
) -> None:
    """One ``--kebab-case`` flag per config field, in its help group; values stay unset unless given.

    The default shown is the one that will run for ``env``: the algorithm's preset for it
    where it has one (marked), else the dataclass default.
    """
    hints = _field_types(cls)
    env = env or cls.env
    preset = preset_for(presets or {}, env)
    found = env_spaces(env) or _EXAMPLE_SPACES[0]  # (an env that cannot be made here: as if Discrete)
    here = cls.space_defaults(*found)
    label = _actions(found[1])
    by_kind = {_actions(act): cls.space_defaults(obs, act) for obs, act in _EXAMPLE_SPACES}
    groups = {g: parser.add_argument_group(GROUP_TITLES.get(g, g)) for g in GROUPS}
    for f in dataclasses.fields(cls):
        base, _ = base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        value = env if f.name == "env" else preset.get(f.name, here.get(f.name, f.default))
        # What the other action spaces would get, where it differs (normalisation, Box's values).
        others = {k: d.get(f.name, f.default) for k, d in by_kind.items() if k != label}
        others = {k: v for k, v in others.items() if v != value and f.name not in preset}
        also = "".join(f"; {k}: {_shown(v)}" for k, v in others.items())
        if f.name in preset:
            help_text += f" (default: {_shown(value)}, {env} preset)"
        elif f.name in here and (also or here[f.name] != f.default):
            help_text += f" (default: {_shown(value)} for {label}{also})"
        elif value is not None:  # None reads in the help text itself ("default: cores")
            help_text += f" (default: {_shown(value)}{also})"
        group = groups[f.metadata.get("group", GROUPS[0])]
        if base is bool:
            group.add_argument(
                flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            choices = f.metadata.get("choices")
            if isinstance(choices, tuple):
                metavar = "{" + ",".join(choices) + "}"
            else:
                metavar = "N,N" if typing.get_origin(base) is tuple else base.__name__.upper()
            group.add_argument(
                flag(f.name),
                dest=f.name,
                default=None,
                metavar=metavar,
                help=help_text,
                type=lambda text, tp=hints[f.name], name=f.name: _flag_value(tp, text, name),
            )


def _actions(space: spaces.Space) -> str:
    """How ``--help`` names the action spaces a default is for."""
    return "Box actions" if isinstance(space, spaces.Box) else f"{type(space).__name__} actions"


# An env with Discrete actions and one with Box actions: what --help shows the other one gets.
_EXAMPLE_SPACES = [
    (spaces.Box(-1, 1, (3,), np.float32), spaces.Discrete(2)),
    (spaces.Box(-1, 1, (3,), np.float32), spaces.Box(-1, 1, (1,), np.float32)),
]

GROUP_TITLES = {
    "algorithm": "algorithm and learner",
    "envs": "environments",
    "distribution": "distribution (several training workers)",
    "run files": "run files (checkpoints, metrics, evaluation)",
    "faults": "faults",
}


def _shown(value: Any) -> str:
    """A default as one would type it: 64,64 for a tuple, 100,000 for a big int."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if is_int(value) and value >= 10_000:
        return f"{value:_}"
    return f"{value:g}" if isinstance(value, float) else str(value)


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


def coerce(cls: type, name: str, value: Any, *, text: bool = True) -> Any:
    """A value from a config file (or, with ``text=False``, a Python keyword) as the field's type.

    Numbers and lists convert to the field's type (an int where a float goes, a list of ints
    for a tuple); with ``text``, so do strings, as on the command line, because YAML reads
    ``1e-3`` as a string. Anything else is refused with one line naming the field.
    """
    tp = _field_types(cls)[name]
    base, optional = base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty: give {kind(base)}")
    bad = ConfigError(f"{name} must be {kind(base)}, got {show(value)}")
    if text and isinstance(value, str) and base is not str:
        try:
            return _parse(tp, value)
        except ValueError:
            raise bad from None
    if typing.get_origin(base) is tuple:
        if isinstance(value, (list, tuple)) and all(is_int(v) for v in value):
            return tuple(int(v) for v in value)
        raise bad
    if base is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise bad
    if base is float and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    if base is int and is_int(value):
        return int(value)
    if base is int and isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
        raise ConfigError(f"{name} must be an int, got {value!r} (write {int(value)})")
    if base is str and isinstance(value, str):
        return value
    raise bad


def unknown_hint(cls: type, key: Any) -> str:
    """ "; it is a setting of <algo> only" or "; did you mean <name>?" for a name ``cls`` lacks."""
    from shoal.algos import ALGORITHMS

    fields = {n: a.config_class.__dataclass_fields__ for n, a in ALGORITHMS.items()}
    owners = [n for n, names in fields.items() if isinstance(key, str) and key in names]
    if owners:
        return f"; it is a setting of {names_list(owners)} only"
    if key in fields:
        return f"; settings go at the top level, not under {key!r}"
    near = difflib.get_close_matches(str(key), [f.name for f in dataclasses.fields(cls)], n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def check_keys(cls: type, keys: Any, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in keys:
        if key not in names:
            raise ConfigError(f"unknown setting {show(key)} in {where}{unknown_hint(cls, key)}")


@functools.lru_cache(maxsize=32)
def _registered_spaces(env: str) -> tuple[spaces.Space, spaces.Space] | None:
    try:
        probe = gym.make(env)
    except Exception:  # reported, in one line, by check_env_fits
        return None
    try:
        return probe.observation_space, probe.action_space
    finally:
        probe.close()


def env_spaces(env: str) -> tuple[spaces.Space, spaces.Space] | None:
    """(observation, action) spaces of a registered env id (one env made, once), else None."""
    ensure_registered(env)
    if ":" in env or env not in gym.registry:
        return None
    return _registered_spaces(env)


def preset_for(presets: dict[str, dict[str, Any]], env: str) -> dict[str, Any]:
    """The preset for ``env``: its exact id's, else the first family pattern matching it
    (``"ALE/*"``: every Atari game; shell-style, as :func:`fnmatch.fnmatchcase` reads it)."""
    if env in presets:
        return presets[env]
    for key, values in presets.items():
        if any(c in key for c in "*?[") and fnmatch.fnmatchcase(env, key):
            return values
    return {}


def layered(
    cls: type[TrainConfig],
    presets: dict[str, dict[str, Any]],
    env: str,
    user: dict[str, Any],
    env_spaces_: tuple[spaces.Space, spaces.Space] | None = None,
    *,
    use_presets: bool = True,
) -> dict[str, Any]:
    """Settings by precedence: the class defaults < its defaults for the env's action space
    (``cls.space_defaults``) < its preset for ``env`` < ``user`` (file, flags, keywords).

    The one place precedence is decided. ``user`` None values of a setting that has a
    space default mean "by the spaces" (a file may say ``normalize_obs: null``).
    """
    found = env_spaces_ if env_spaces_ is not None else env_spaces(env)
    by_space = cls.space_defaults(*found) if found is not None else {}
    values = dict(by_space)
    if use_presets:
        values.update(preset_for(presets, env))
    values.update({k: v for k, v in user.items() if not (v is None and k in by_space)})
    values["env"] = env
    return values


def settle(config: TrainConfig, obs_space: spaces.Space, action_space: spaces.Space) -> None:
    """Give the settings still left to the spaces (None) their value for these spaces.

    For a config built without knowing the env's spaces (a custom env, a config object):
    after this every setting is concrete, as ``config.yaml`` shows it.
    """
    for name, value in type(config).space_defaults(obs_space, action_space).items():
        if getattr(config, name) is None:
            setattr(config, name, value)


def resolve(
    cls: type[TrainConfig],
    presets: dict[str, dict[str, Any]],
    file_values: dict[str, Any],
    flag_values: dict[str, Any],
) -> TrainConfig:
    """Defaults < action-space defaults < preset for the env < file < flags, then validated."""
    file_values = {k: v for k, v in file_values.items() if k != "algo"}  # a saved config.yaml names it
    check_keys(cls, file_values, "the config file")
    file_values = {k: coerce(cls, k, v) for k, v in file_values.items()}
    flags = {k: v for k, v in flag_values.items() if v is not None}
    env = next((v for v in (flags.get("env"), file_values.get("env")) if v is not None), cls.env)
    values = layered(cls, presets, env, {**file_values, **flags})
    config = cls(**values)
    validate(config, explicit=flags)
    return config


def validate(
    config: TrainConfig, algo: str | None = None, *, explicit: Iterable[str] = (), registered: bool = True
) -> None:
    """Raise ConfigError for the first problem found: the config's own rules, then this machine's.

    ``config.validate`` holds every rule about values (the class's, then its bases');
    here: what this machine has (cores, Ray, a GPU, a writable run directory) and whether
    the env id is registered (``registered=False``: the env is a callable, not an id).
    """
    config.validate(explicit=explicit)
    c = config
    check_run_dir(c.run_dir)
    cores = os.cpu_count() or 1
    if c.backend == "mp" and c.num_workers > 4 * cores:
        raise ConfigError(
            f"num_workers {c.num_workers} on --backend mp starts that many processes on this machine's"
            f" {cores} cores; use at most {4 * cores}, or --backend ray for a cluster"
        )
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
    if registered:
        check_env_id(c.env)


def check_env_id(env: str) -> None:
    """A registered env id, and no ``module:Env`` import: naming a module runs its code."""
    if ":" in env:
        raise ConfigError(
            f"env {show(env)} names a module to import; import it yourself (it registers its envs)"
            " and pass the bare env id"
        )
    ensure_registered(env)
    if env not in gym.registry and env.startswith("ALE/"):
        raise ConfigError(f"env {show(env)} is an Atari game: install ale-py with pip install 'shoal[atari]'")
    if env not in gym.registry:
        near = difflib.get_close_matches(env, list(gym.registry), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown env id {show(env)}{hint}")


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


def check_env_fits(algo: str, config: TrainConfig, env_fn: Callable[..., gym.Env] | None = None) -> None:
    """Algorithm/env compatibility and memory, from the env's spaces (one env is made and closed)."""
    try:  # a missing optional dependency (box2d, mujoco) or a broken constructor
        source = env_fn or env_source(config.env, config.atari_wrappers)  # the spaces the learner sees
        probe = source() if callable(source) else gym.make(source)
    except Exception as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConfigError(f"cannot make env {config.env}: {type(e).__name__}: {first}") from None
    try:
        obs_space, action_space = probe.observation_space, probe.action_space
    finally:
        probe.close()
    settle(config, obs_space, action_space)
    config.check_spaces(algo, config.env, obs_space, action_space)
    available = _available_memory()
    if available is None:
        return
    need = config.memory_needed(obs_space, action_space)
    if not need:
        return
    workers = config.num_workers if config.backend == "mp" else 1  # every mp worker is on this machine
    total = workers * sum(need.values())
    if total > available:
        biggest = max(need, key=need.__getitem__)
        lower = " or ".join(flag(name) for name in biggest.split("*"))
        raise ConfigError(
            f"this config needs about {_size(total)} of memory ({_size(workers * need[biggest])} sized by"
            f" {biggest.replace('*', ' x ')}) but this machine has {_size(available)} available;"
            f" lower {lower}"
        )


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if nbytes < 1000 or unit == "PB":
            return f"{nbytes:,.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"


__all__ = ["ConfigError", "UnknownSettingError", "MAX_INT", "show", "coerce", "resolve", "validate"]

"""Config dataclasses <-> command-line flags and YAML/TOML files, validated up front.

Precedence: the dataclass defaults < the algorithm's preset for the env < a config file <
flags. Every problem is reported as ONE actionable line (``ConfigError``) before any env,
worker or process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium import spaces

from shoal.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """Invalid configuration; its message is one line a user can act on."""


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


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML (.yaml/.yml) or TOML (.toml) file, as a flat mapping."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    except (OSError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot read config file {path}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold key: value settings, got {type(data).__name__}")
    return data


def _coerce(cls: type, name: str, value: Any) -> Any:
    """A value from a file, checked against the field's type."""
    tp = _field_types(cls)[name]
    base, optional = _base(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty")
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            return _parse(tp, value)
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        raise ConfigError(f"{name} must be a list of integers like [64, 64], got {value!r}")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is str and isinstance(value, str):
        return value
    raise ConfigError(f"{name} must be {'an' if base is int else 'a'} {base.__name__}, got {value!r}")


def check_keys(cls: type, keys: Any, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown setting {key!r} in {where}{hint}")


def resolve(
    cls: type[TrainConfig],
    presets: dict[str, dict[str, Any]],
    file_values: dict[str, Any],
    flag_values: dict[str, Any],
) -> TrainConfig:
    """Defaults < preset for the env < file < flags, then validated."""
    file_values = {k: v for k, v in file_values.items() if k != "algo"}  # a saved config.yaml names it
    check_keys(cls, file_values, "the config file")
    file_values = {k: _coerce(cls, k, v) for k, v in file_values.items()}
    flags = {k: v for k, v in flag_values.items() if v is not None}
    env = flags.get("env") or file_values.get("env") or cls.env
    values = dict(presets.get(env, {}))
    values.update(file_values)
    values.update(flags)
    values["env"] = env
    config = cls(**values)
    validate(config)
    return config


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
)
NON_NEGATIVE = ("learning_starts", "checkpoint_every", "ent_coef", "vf_coef", "seed")


def validate(config: TrainConfig, algo: str | None = None) -> None:
    """Raise ConfigError for the first problem found; cheap checks before the env probe."""
    for name in POSITIVE:
        value = getattr(config, name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name in NON_NEGATIVE:
        value = getattr(config, name, 0)
        if value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")
    if config.env_workers is not None and config.env_workers < 1:
        raise ConfigError(f"env_workers must be a positive integer, got {config.env_workers}")
    if not 0 < getattr(config, "gamma", 0.99) <= 1:
        raise ConfigError(f"gamma must be in (0, 1], got {config.gamma}")
    if not 0 <= getattr(config, "gae_lambda", 1.0) <= 1:
        raise ConfigError(f"gae_lambda must be in [0, 1], got {config.gae_lambda}")
    for name in ("learning_rate", "clip_coef", "max_grad_norm"):
        if getattr(config, name, 1.0) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(config, name)}")
    for name in ("exploration_initial_eps", "exploration_final_eps", "exploration_fraction", "tau"):
        value = getattr(config, name, 0.5)
        if not 0 <= value <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {value}")
    from shoal.launch import BACKENDS, STRATEGIES

    if config.backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {config.backend!r}")
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {config.strategy!r}")
    if config.backend == "local" and config.num_workers > 1:
        raise ConfigError(
            f"num_workers {config.num_workers} needs --backend mp or ray (local runs one learner)"
        )
    if config.backend == "local" and config.strategy != "sync":
        raise ConfigError(
            f"strategy {config.strategy} needs several workers: add --backend mp (or ray) --num-workers 2"
        )
    if config.ps_mode not in ("sync", "async"):
        raise ConfigError(f"ps_mode must be sync or async, got {config.ps_mode!r}")
    from shoal.compress import MODES

    if config.compress not in MODES:
        raise ConfigError(f"compress must be one of {', '.join(MODES)}, got {config.compress!r}")
    if not 0 < config.topk_ratio <= 1:
        raise ConfigError(f"topk_ratio must be in (0, 1], got {config.topk_ratio}")
    if config.max_policy_lag < 0:
        raise ConfigError(f"max_policy_lag must be >= 0, got {config.max_policy_lag}")
    if config.ray_cpus_per_worker < 0 or config.ray_gpus_per_worker < 0:
        raise ConfigError("ray_cpus_per_worker and ray_gpus_per_worker must be >= 0")
    if config.ray_address is not None and config.backend != "ray":
        raise ConfigError(f"ray_address is for --backend ray, not {config.backend}")
    if config.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError("backend ray needs Ray: pip install 'shoal[ray]' (or use --backend mp)")
    if config.on_env_error not in ("restart", "raise"):
        raise ConfigError(f"on_env_error must be restart or raise, got {config.on_env_error!r}")
    if config.step_timeout < 0:
        raise ConfigError(f"step_timeout must be >= 0 seconds (0: no limit), got {config.step_timeout}")
    if config.max_restarts < 0:
        raise ConfigError(f"max_restarts must be >= 0, got {config.max_restarts}")
    if config.nan_policy not in ("raise", "skip"):
        raise ConfigError(f"nan_policy must be raise or skip, got {config.nan_policy!r}")
    if config.vectorization not in ("auto", "sync", "process"):
        raise ConfigError(f"vectorization must be auto, sync or process, got {config.vectorization!r}")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {config.device!r}")
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto"
            )
    if config.env not in gym.registry:
        near = difflib.get_close_matches(config.env, list(gym.registry), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown env id {config.env!r}{hint}")


def check_env_fits(algo: str, config: TrainConfig) -> None:
    """Algorithm/env compatibility, from the env's spaces (one env is made and closed)."""
    probe = gym.make(config.env)
    try:
        action_space = probe.action_space
    finally:
        probe.close()
    if algo == "dqn" and not isinstance(action_space, spaces.Discrete):
        raise ConfigError(f"dqn needs discrete actions but {config.env} has {action_space}; use ppo or a2c")
    if not isinstance(action_space, (spaces.Discrete, spaces.Box)):
        raise ConfigError(f"{algo} supports Discrete and Box action spaces, {config.env} has {action_space}")

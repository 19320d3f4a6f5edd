"""The Python API: ``shoal.PPO("CartPole-v1", num_envs=8, seed=1).learn(100_000)``."""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from shoal.algos import ALGORITHMS
from shoal.config import TrainConfig
from shoal.configio import (
    MAX_INT,
    ConfigError,
    UnknownSettingError,
    check_env_fits,
    coerce,
    show,
    unknown_hint,
    validate,
)
from shoal.run import checkpoint as ckpt
from shoal.training.trainer import Trainer, config_dict, spaces_of


def make_config(algo: str, env: str, overrides: dict[str, Any], *, presets: bool = True) -> TrainConfig:
    """Defaults < the algorithm's preset for ``env`` < ``overrides``; unknown keys refused.

    Values are checked against the field types here (an int is fine where a float goes, a
    list where ``hidden`` goes); ranges and combinations are :func:`shoal.configio.validate`'s.
    """
    if algo not in ALGORITHMS:
        near = difflib.get_close_matches(str(algo), list(ALGORITHMS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown algorithm {show(algo)}; available: {', '.join(ALGORITHMS)}{hint}")
    cls = ALGORITHMS[algo].config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in fields:
            raise UnknownSettingError(f"{algo} has no setting {show(key)}{unknown_hint(cls, key)}")
    values = dict(ALGORITHMS[algo].presets.get(env, {})) if presets else {}
    values.update({k: coerce(cls, k, v, text=False) for k, v in overrides.items()})
    values["env"] = env
    return cls(**values)


class Agent:
    """One algorithm, its config and its learned weights."""

    def __init__(
        self,
        algo: str,
        env: str | Callable[..., gym.Env],
        config: TrainConfig | None = None,
        **overrides: Any,
    ) -> None:
        # Every check runs here, before any env or process starts, and fails as a ConfigError
        # with the one line the command line would print.
        if not isinstance(env, str) and not callable(env):
            raise ConfigError(
                f"env must be a gymnasium env id or a function returning an env, got {show(env)}"
            )
        env_id = env if isinstance(env, str) else getattr(env, "__name__", "custom")
        self.algo_name = algo
        self.env_fn = None if isinstance(env, str) else env
        if config is None:
            config = make_config(algo, env_id, overrides)
        elif overrides:
            raise ConfigError("pass a config or keyword settings, not both")
        elif not isinstance(config, ALGORITHMS[algo].config_class):
            raise ConfigError(
                f"config must be a {ALGORITHMS[algo].config_class.__name__}, got {show(config)}"
            )
        validate(config, explicit=overrides, registered=self.env_fn is None)
        if self.env_fn is not None and config.backend != "local":
            raise ConfigError(
                f"backend {config.backend!r} needs a registered env id: every worker makes its own envs"
            )
        check_env_fits(algo, config, self.env_fn)
        self.config = config
        self.trainer = Trainer(ALGORITHMS[algo], self.config, env_fn=self.env_fn)
        self.algorithm = self.trainer.algo
        self.summary: dict[str, Any] = {}

    def learn(self, total_steps: int | None = None, *, progress: bool = True) -> Agent:
        """Train (to ``total_steps`` env steps, default the config's) and evaluate greedily."""
        if total_steps is not None:
            integral = isinstance(total_steps, numbers.Real) and float(total_steps).is_integer()
            if isinstance(total_steps, bool) or not integral or not 1 <= total_steps <= MAX_INT:
                raise ConfigError(f"total_steps must be a positive integer, got {show(total_steps)}")
            self.config.total_steps = int(total_steps)  # 1e5 is fine: it is a whole number
        if self.config.backend == "local":
            self.trainer.progress = progress
            self.summary = self.trainer.train()
            return self
        from shoal.launch import train

        validate(self.config)
        self.summary, run_dir = train(self.algo_name, self.config, progress=progress)
        self.trainer.run_dir = Path(run_dir)
        self.trainer.load_checkpoint(ckpt.latest(self.trainer.run_dir / "checkpoints"))  # the chief's weights
        return self

    @property
    def run_dir(self) -> Path:
        return self.trainer.run_dir

    def act(self, obs: Any, deterministic: bool = True) -> np.ndarray:
        """Actions for one observation or a batch (greedy unless ``deterministic=False``)."""
        obs = np.asarray(obs)
        single = obs.shape == self.algorithm.obs_space.shape
        actions = self.algorithm.predict(obs[None] if single else obs, deterministic)
        return actions[0] if single else actions

    def save(self, path: str | Path) -> Path:
        """Weights (safetensors) + config (JSON) under ``path``; load with :func:`shoal.load`."""
        self.trainer.run_dir = Path(path)
        return self.trainer.save_checkpoint()


def load(path: str | Path, env: Callable[..., gym.Env] | None = None) -> Agent:
    """An agent from a saved path, a run directory or a checkpoint file (never unpickles)."""
    arrays, meta = ckpt.load(path)
    ckpt.check_run(meta, path)
    algo = meta["algo"]
    values = dict(meta["config"])
    env_id = values.pop("env")
    config = make_config(algo, env_id, values, presets=False)
    agent = Agent.__new__(Agent)
    agent.algo_name, agent.env_fn, agent.config, agent.summary = algo, env, config, {}
    spaces_of(env or env_id)  # fail early, and clearly, for an unknown env
    agent.trainer = Trainer(ALGORITHMS[algo], config, env_fn=env)
    agent.trainer.load_checkpoint(path)
    agent.algorithm = agent.trainer.algo
    return agent


def PPO(env: str | Callable[..., gym.Env], **config: Any) -> Agent:  # noqa: N802
    """Proximal Policy Optimization (see :mod:`shoal.algos.ppo` for every setting)."""
    return Agent("ppo", env, **config)


def A2C(env: str | Callable[..., gym.Env], **config: Any) -> Agent:  # noqa: N802
    """Advantage Actor-Critic (see :mod:`shoal.algos.a2c`)."""
    return Agent("a2c", env, **config)


def DQN(env: str | Callable[..., gym.Env], **config: Any) -> Agent:  # noqa: N802
    """Deep Q-Network with double-DQN targets (see :mod:`shoal.algos.dqn`)."""
    return Agent("dqn", env, **config)


__all__ = ["Agent", "PPO", "A2C", "DQN", "load", "make_config", "config_dict"]

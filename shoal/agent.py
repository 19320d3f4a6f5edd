"""The Python API: ``shoal.PPO("CartPole-v1", num_envs=8, seed=1).learn(100_000)``.

Two things are called PPO, on purpose: ``shoal.PPO(...)`` (here) makes an :class:`Agent`,
what a user trains, saves, loads and acts with; ``shoal.algos.PPO`` is the algorithm inside
it (networks, buffers, loss), which the training loop drives. Users need only the first.
"""

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
    check_env_id,
    coerce,
    layered,
    show,
    unknown_hint,
    validate,
)
from shoal.run import checkpoint as ckpt
from shoal.training.trainer import Trainer, config_dict, spaces_of


def make_config(
    algo: str,
    env: str,
    overrides: dict[str, Any],
    *,
    presets: bool = True,
    spaces: tuple[gym.Space, gym.Space] | None = None,
) -> TrainConfig:
    """Defaults < action-space defaults < the algorithm's preset for ``env`` < ``overrides``;
    unknown keys refused. ``presets=False``: no env preset (the action-space defaults stay).

    ``spaces``: the env's (observation, action) spaces, when ``env`` is not a registered id
    (a registered one is made once to find them). Values are checked against the field types
    here (an int is fine where a float goes, a list where ``hidden`` goes); ranges and
    combinations are :func:`shoal.configio.validate`'s.
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
    user = {k: coerce(cls, k, v, text=False) for k, v in overrides.items()}
    values = layered(cls, ALGORITHMS[algo].presets, env, user, spaces, use_presets=presets)
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
            found = None
            if self.env_fn is not None:  # an id: make_config probes it itself
                try:
                    found = spaces_of(self.env_fn)
                except Exception:  # check_env_fits reports it in one line
                    found = None
            config = make_config(algo, env_id, overrides, spaces=found)
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
        else:
            from shoal.launch import train

            validate(self.config)
            self.summary, run_dir = train(self.algo_name, self.config, progress=progress)
            self.trainer.run_dir = Path(run_dir)
            self.trainer.load_checkpoint(ckpt.latest(self.trainer.run_dir / "checkpoints"))  # the chief's
        if progress and "mean_return" in self.summary:  # what a run ends with, as the CLI prints it
            print(result_line(self.algo_name, self.env_name, self.summary, self.run_dir))
        return self

    @property
    def env_name(self) -> str:
        return self.config.env

    @property
    def run_dir(self) -> Path:
        """Where this agent's run (or, once loaded, its checkpoint) lives: an absolute path."""
        return Path(self.trainer.run_dir).absolute()

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


def load(
    path: str | Path,
    env: str | Callable[..., gym.Env] | None = None,
    *,
    device: str | None = None,
    best: bool = False,
) -> Agent:
    """An agent from a saved path, a run directory or a checkpoint file (never unpickles).

    A checkpoint is data: its config is validated like flags, and its env id must be
    registered already (a ``module:Env`` id, which ``gym.make`` would import, is refused;
    import your module, or pass ``env``). Its ``device`` is a preference: without a GPU a
    CUDA checkpoint loads on the CPU; ``device`` overrides it. ``best``: the run's best
    checkpoint (``--eval-every``) instead of its latest; it holds no replay buffer.
    """
    if best:
        path = best_checkpoint(path)
    algo, config, _meta = read_checkpoint(path, env=None if callable(env) else env, custom_env=callable(env))
    if device is not None:
        config.device = device
        validate(config, registered=False)
    elif config.device != "cpu" and not _device_usable(config.device):
        config.device = "cpu"
    env_fn = env if callable(env) else None
    agent = Agent.__new__(Agent)
    agent.algo_name, agent.env_fn, agent.config, agent.summary = algo, env_fn, config, {}
    if env_fn is None:
        check_env_fits(algo, config)  # spaces supported, before anything is built
    agent.trainer = Trainer(ALGORITHMS[algo], config, env_fn=env_fn)
    agent.trainer.run_dir = run_dir_of(path)
    agent.trainer.load_checkpoint(path)
    agent.algorithm = agent.trainer.algo
    return agent


def best_checkpoint(run_dir: str | Path) -> Path:
    """The best checkpoint of a run directory; one line if there is none."""
    if not Path(run_dir).is_dir():
        raise ConfigError(f"best=True takes a run directory; {run_dir} is not a directory")
    found = ckpt.best(run_dir_of(run_dir))
    if found is None:
        raise ckpt.CheckpointError(
            f"{run_dir} has no best checkpoint (checkpoints/best/): the run was trained without"
            " --eval-every (or stopped before its first evaluation)"
        )
    return found


def run_dir_of(path: str | Path) -> Path:
    """The folder a saved agent lives in: ``path`` itself, or the one holding ``checkpoints/``."""
    path = Path(path).absolute()
    if path.is_file():
        path = path.parent
    if path.name == ckpt.BEST and path.parent.name == "checkpoints":
        path = path.parent
    return path.parent if path.name == "checkpoints" else path


def _device_usable(device: str) -> bool:
    if not device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()


def read_checkpoint(
    path: str | Path, env: str | None = None, *, custom_env: bool = False
) -> tuple[str, TrainConfig, dict[str, Any]]:
    """(algorithm, validated config, meta) of a checkpoint, checked like user input, nothing imported.

    ``env``: the env id the user named (it must be the one the checkpoint was trained on);
    ``custom_env``: the user passes the env as a function, so the saved id is only a name.
    """
    _, meta = ckpt.load(path)
    ckpt.check_run(meta, path)
    where = f"checkpoint {path}"
    algo = meta["algo"]
    if algo not in ALGORITHMS:
        raise ckpt.CheckpointError(f"{where} is of algorithm {show(algo)}; shoal has {', '.join(ALGORITHMS)}")
    values = dict(meta["config"])
    env_id = values.pop("env")
    for name in ("normalize_obs", "normalize_reward"):  # saved before normalisation existed: none
        values.setdefault(name, False)
    values.setdefault("atari_wrappers", False)  # saved before it existed: trained on raw frames
    if env is not None and env != env_id:
        raise ConfigError(f"{where} was trained on {show(env_id)}, not {show(env)}")
    try:
        if not custom_env:
            check_env_id(env_id)  # never gym.make an id from a file that is not registered
        config = make_config(algo, env_id, values, presets=False)
        config.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for name in ("env_steps", "updates", "boundary"):
        value = meta[name]
        if not (type(value) is int and 0 <= value <= MAX_INT):
            raise ConfigError(f"{where}: {name} must be a non-negative integer, got {show(value)}")
    slack = config.step_overshoot()  # the last step of a run may pass total_steps
    if meta["env_steps"] > config.total_steps + slack:
        raise ConfigError(
            f"{where}: env_steps {meta['env_steps']:,} is past the run's total_steps {config.total_steps:,}"
        )
    if meta["boundary"] > meta["env_steps"]:
        raise ConfigError(f"{where}: boundary {meta['boundary']} is past env_steps {meta['env_steps']}")
    return algo, config, meta


def result_line(algo: str, env: str, result: dict[str, Any], run_dir: str | Path | None = None) -> str:
    """The one line a run or an evaluation ends with, in the same words from the CLI and Python."""
    line = (
        f"shoal: {algo} on {env}: mean greedy return {result['mean_return']:.1f}"
        f" +- {result['std_return']:.1f} over {result['episodes']} episodes"
    )
    if "best_eval_return" in result:
        best, at = result["best_eval_return"], result["best_eval_env_steps"]
        line += f"; best periodic evaluation {best:.1f} at step {at:,}"
    return line + (f"; run in {Path(run_dir).absolute()}" if run_dir is not None else "")


def PPO(env: str | Callable[..., gym.Env], **config: Any) -> Agent:  # noqa: N802
    """Proximal Policy Optimization (see :mod:`shoal.algos.ppo` for every setting)."""
    return Agent("ppo", env, **config)


def A2C(env: str | Callable[..., gym.Env], **config: Any) -> Agent:  # noqa: N802
    """Advantage Actor-Critic (see :mod:`shoal.algos.a2c`)."""
    return Agent("a2c", env, **config)


def DQN(env: str | Callable[..., gym.Env], **config: Any) -> Agent:  # noqa: N802
    """Deep Q-Network with double-DQN targets (see :mod:`shoal.algos.dqn`)."""
    return Agent("dqn", env, **config)


def SAC(env: str | Callable[..., gym.Env], **config: Any) -> Agent:  # noqa: N802
    """Soft Actor-Critic, continuous actions (see :mod:`shoal.algos.sac`)."""
    return Agent("sac", env, **config)


def TD3(env: str | Callable[..., gym.Env], **config: Any) -> Agent:  # noqa: N802
    """Twin Delayed DDPG, continuous actions (see :mod:`shoal.algos.td3`)."""
    return Agent("td3", env, **config)


def IMPALA(env: str, **config: Any) -> Agent:  # noqa: N802
    """IMPALA, V-trace actor-critic with actor processes (see :mod:`shoal.algos.impala`)."""
    return Agent("impala", env, **config)


def APPO(env: str, **config: Any) -> Agent:  # noqa: N802
    """Asynchronous PPO with V-trace, with actor processes (see :mod:`shoal.algos.appo`)."""
    return Agent("appo", env, **config)


__all__ = [
    "Agent",
    "IMPALA",
    "APPO",
    "PPO",
    "A2C",
    "DQN",
    "SAC",
    "TD3",
    "load",
    "make_config",
    "config_dict",
    "read_checkpoint",
]

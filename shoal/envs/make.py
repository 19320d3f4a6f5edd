"""make_vec: one call from an env id (or a callable) to a seeded vector env."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.vector import SyncVectorEnv, VectorEnv

from shoal.envs.atari import ensure_registered
from shoal.envs.process_vector_env import ProcessVectorEnv

log = logging.getLogger("shoal")  # the CLI shows it (unless --quiet); a library installs no handler

# A process step costs about this much more than an in-process one, whatever the env
# (two semaphore wake-ups per step; measured with benchmarks/vector_envs.py).
PROCESS_OVERHEAD_S = 30e-6
# Inside a training loop it costs more: the learner's work between two steps lets the env
# workers fall asleep, and waking them is slow. PPO on CartPole-v1 with 8 envs ran 6% slower
# with 2 env workers than in-process (medians of 3: 5.8k vs 6.2k env steps/s), although
# a lone process step is faster there (benchmarks/vector_envs.py): ~120 us per step.
TRAINING_PROCESS_OVERHEAD_S = 120e-6

Vectorization = Literal["auto", "sync", "process"]


class SeededEnv(gym.Wrapper):
    """Seeds its env's first reset (and its spaces) with a fixed seed, unless one is given.

    This is what makes ``make_vec(..., seed=s)`` reproducible without the caller passing the
    seed to ``reset``: env ``i`` always starts from ``s + i``.
    """

    def __init__(self, env: gym.Env, seed: int) -> None:
        super().__init__(env)
        self._first_seed: int | None = seed
        env.action_space.seed(seed)
        env.observation_space.seed(seed)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        if seed is None and self._first_seed is not None:
            seed = self._first_seed
        self._first_seed = None
        return self.env.reset(seed=seed, options=options)


def restart_seed(seed: int | None, index: int, restart: int, kind: int = 0) -> int | None:
    """The seed of env ``index`` after its ``restart``-th restart: fixed by the run seed alone.

    ``kind`` keeps env restarts (0) and env-worker restarts (1) on separate streams.
    """
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, index, restart, kind]).generate_state(1)[0])


class EnvBrokenError(RuntimeError):
    """An env that raises again as soon as it is made anew: restarting it cannot help."""


class RestartOnError(gym.Wrapper):
    """An env that, when it raises in ``step`` or ``reset``, is closed and made anew.

    The step that raised returns the new env's first observation with reward 0, not done,
    and ``info["env_restarted"] = True``, so a learner can drop the cut episode; the new env
    is reset with a seed derived from the run seed and its restart count (reproducible).
    """

    def __init__(self, make: Callable[[], gym.Env], index: int, seed: int | None) -> None:
        super().__init__(make())
        self._make, self.index, self.seed = make, index, seed
        self.restarts = 0

    def _restart(self, exc: Exception, during: str) -> tuple[Any, dict[str, Any]]:
        self.restarts += 1
        log.warning(
            f"env {self.index} raised {type(exc).__name__} in {during}: {exc}; restarting it "
            f"(restart {self.restarts} of this env)",
            exc_info=exc,
        )
        with contextlib.suppress(Exception):
            self.env.close()
        made = False
        try:
            self.env, made = self._make(), True
            obs, info = self.env.reset(seed=restart_seed(self.seed, self.index, self.restarts))
        except Exception as again:
            raise EnvBrokenError(
                f"env {self.index} raised {type(exc).__name__} in {during}, and made anew it raised "
                f"{type(again).__name__} in {'reset' if made else 'make'} at once: "
                f"{' '.join(str(again).split())[:300]}; fix the env (the warning above has its traceback)"
            ) from None
        return obs, {**info, "env_restarted": True}

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        try:
            return self.env.step(action)
        except Exception as exc:
            obs, info = self._restart(exc, "step")
            return obs, 0.0, False, False, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        try:
            return self.env.reset(seed=seed, options=options)
        except Exception as exc:
            return self._restart(exc, "reset")


class _RestartingFactory:
    """Picklable constructor of a :class:`RestartOnError` env."""

    def __init__(self, make: Callable[[], gym.Env], index: int, seed: int | None) -> None:
        self.make, self.index, self.seed = make, index, seed

    def __call__(self) -> gym.Env:
        return RestartOnError(self.make, self.index, self.seed)


class _EnvFactory:
    """Picklable env constructor (env ``index`` of a vector env)."""

    def __init__(
        self,
        env: str | Callable[..., gym.Env],
        index: int,
        seed: int | None,
        wrappers: Sequence[Callable[[gym.Env], gym.Env]],
        env_kwargs: dict[str, Any],
    ) -> None:
        self.env, self.index, self.seed = env, index, seed
        self.wrappers, self.env_kwargs = tuple(wrappers), env_kwargs

    def __call__(self) -> gym.Env:
        if isinstance(self.env, str):
            ensure_registered(self.env)  # (a spawned env worker starts with gymnasium's registry)
            env = gym.make(self.env, **self.env_kwargs)
        else:
            env = self.env(**self.env_kwargs)
        for wrap in self.wrappers:
            env = wrap(env)
        if self.seed is not None:
            env = SeededEnv(env, self.seed + self.index)
        return env


def _step_time(make_env: Callable[[], gym.Env], budget_s: float = 0.05) -> float:
    """Median-free quick estimate of one env step's cost, in seconds."""
    env = make_env()
    try:
        env.reset(seed=0)
        env.action_space.seed(0)
        steps, start = 0, time.perf_counter()
        while steps < 2000 and time.perf_counter() - start < budget_s:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                env.reset()
            steps += 1
        return (time.perf_counter() - start) / max(steps, 1)
    finally:
        env.close()


def _worker_restart_seed(seed: int | None, index: int, restart: int) -> int | None:
    return restart_seed(seed, index, restart, kind=1)


def choose_vectorization(
    step_s: float, num_envs: int, num_workers: int, overhead_s: float = PROCESS_OVERHEAD_S
) -> str:
    """'process' when splitting the envs over workers saves more than processes cost
    (``overhead_s`` per step on top of an in-process step)."""
    if num_workers < 2 or num_envs < 2:
        return "sync"
    serial = step_s * num_envs
    parallel = step_s * math.ceil(num_envs / num_workers) + overhead_s
    return "process" if parallel < 0.8 * serial else "sync"


def make_vec(
    env: str | Callable[..., gym.Env],
    num_envs: int,
    *,
    seed: int | None = None,
    num_workers: int | Literal["auto"] = "auto",
    vectorization: Vectorization = "auto",
    wrappers: Sequence[Callable[[gym.Env], gym.Env]] = (),
    vector_kwargs: dict[str, Any] | None = None,
    on_error: Literal["raise", "restart"] = "raise",
    step_timeout: float | None = None,
    process_overhead_s: float = PROCESS_OVERHEAD_S,
    **env_kwargs: Any,
) -> VectorEnv:
    """Make ``num_envs`` copies of an env, stepped in-process or by worker processes.

    Args:
        env: a registered env id, or a callable returning a gymnasium env.
        num_envs: how many envs.
        seed: env ``i`` is seeded with ``seed + i`` at its first reset, so a seed gives
            the same trajectories whatever ``num_workers`` and ``vectorization``.
        num_workers: env worker processes for ``"process"`` (``"auto"``: one per core).
        vectorization: ``"sync"`` (one process), ``"process"`` (:class:`ProcessVectorEnv`),
            or ``"auto"``: times one env briefly and picks processes only if they pay off.
        wrappers: applied to each env, innermost first.
        vector_kwargs: passed to the vector env (e.g. ``autoreset_mode``, ``copy``).
        on_error: ``"raise"``: an env's exception reaches the caller (with the env index);
            ``"restart"``: the env is made anew (see :class:`RestartOnError`), and with
            ``"process"`` a dead or hung env worker is restarted too
            (``info["env_worker_restarted"]``).
        step_timeout: with ``"process"``, seconds a step may take before its worker counts
            as hung (``None``: no limit). In-process envs cannot be interrupted.
        process_overhead_s: for ``"auto"``, what a process step costs on top of an
            in-process one (``TRAINING_PROCESS_OVERHEAD_S`` inside a training loop).
        **env_kwargs: passed to ``gym.make`` (or to the callable).
    """
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    if vectorization not in ("auto", "sync", "process"):
        raise ValueError(f"vectorization must be 'auto', 'sync' or 'process', got {vectorization!r}")
    if num_workers == "auto":
        num_workers = min(num_envs, os.cpu_count() or 1)
    elif not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer or 'auto', got {num_workers!r}")
    ensure_registered(env)
    if isinstance(env, str) and env not in gym.registry:
        import difflib

        close = difflib.get_close_matches(env, list(gym.registry), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown env id {env!r}{hint}")
    if on_error not in ("raise", "restart"):
        raise ValueError(f"on_error must be 'raise' or 'restart', got {on_error!r}")
    fns: list[Callable[[], gym.Env]] = [
        _EnvFactory(env, i, seed, wrappers, env_kwargs) for i in range(num_envs)
    ]
    if on_error == "restart":
        fns = [_RestartingFactory(fn, i, seed) for i, fn in enumerate(fns)]
    name = env if isinstance(env, str) else getattr(env, "__name__", repr(env))
    if vectorization == "auto":
        step_s = _step_time(_EnvFactory(env, 0, None, wrappers, env_kwargs))
        vectorization = choose_vectorization(step_s, num_envs, num_workers, process_overhead_s)  # type: ignore[assignment]
        detail = f" with {min(num_workers, num_envs)} env workers" if vectorization == "process" else ""
        log.info(
            f"make_vec({name!r}, {num_envs}): vectorization='auto' picked {vectorization!r}"
            f"{detail} (one env step takes {step_s * 1e6:.0f} us)"
        )
    kwargs = dict(vector_kwargs or {})
    if vectorization == "process":
        kwargs.setdefault("on_failure", on_error)
        kwargs.setdefault("step_timeout", step_timeout)
        kwargs.setdefault("reseed", functools.partial(_worker_restart_seed, seed))
        vec: VectorEnv = ProcessVectorEnv(fns, num_workers=num_workers, **kwargs)
    else:
        vec = SyncVectorEnv(fns, **kwargs)
    if seed is not None:
        vec.action_space.seed(seed)
        vec.observation_space.seed(seed)
    return vec

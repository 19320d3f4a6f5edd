"""The training loop every algorithm shares: envs -> experience -> learner -> checkpoints.

Exact resume: environment state cannot be saved in general, so checkpoints are taken at
update boundaries every ``checkpoint_every`` env steps, and at each boundary EVERY run,
interrupted or not, starts fresh episodes with ``reset(seed=derived_seed(seed, k))``. A run
resumed from checkpoint ``k`` therefore sees exactly the environments, random streams and
weights the uninterrupted run saw, and ends with the same parameters. At a boundary the
last rollout has already been used (and bootstrapped from its final values), so cutting
episodes there costs an on-policy learner nothing; DQN keeps its replay buffer.

A stop (SIGINT or SIGTERM through the CLI, see :class:`StopRequest`) saves a checkpoint
between two env steps, off the boundaries. Resuming from it works like any resume (fresh
episodes, seeded as at the last boundary) but is not bitwise the run that was never
stopped: the unfinished rollout and partial n-step transitions are dropped, and the
episodes in progress are cut.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import yaml

from shoal import guards
from shoal.algos.base import Algorithm
from shoal.config import ConfigError, TrainConfig
from shoal.distributed.strategy import LocalStrategy, Strategy
from shoal.envs import make_vec
from shoal.envs.atari import env_source, game_scores, reports_games
from shoal.envs.make import TRAINING_PROCESS_OVERHEAD_S
from shoal.run import checkpoint as ckpt
from shoal.run.logger import RunLogger
from shoal.run.rundir import choose_run_dir
from shoal.training.callbacks import (
    Callback,
    CheckpointBoundaries,
    CrashAfterCheckpoints,
    FaultInjection,
    MetricsRow,
    PeriodicEvaluation,
    StopVote,
    UserHook,
)
from shoal.training.episodes import EnvFaults, Episodes, RestartLimitError

__all__ = ["RestartLimitError", "StopRequest", "Trainer", "evaluate"]

log = logging.getLogger("shoal")

EVAL_SEED_OFFSET = 1_000_000_007  # evaluation envs never share seeds with training envs
EVAL_ENVS = 20  # episodes an evaluation plays at once (the default --eval-episodes)


class StopRequest:
    """Asks a running training loop to stop: it finishes its env step or update, saves a
    checkpoint, closes its envs and returns. Set from a signal handler, so it only flips a field."""

    def __init__(self) -> None:
        self.signal: str | None = None  # why: "SIGINT", "SIGTERM", ...

    def request(self, why: str = "stop") -> None:
        self.signal = self.signal or why

    def clear(self) -> None:
        self.signal = None

    def __bool__(self) -> bool:
        return self.signal is not None


def derived_seed(seed: int, k: int) -> int:
    """Seed of the episodes started at checkpoint boundary ``k``."""
    return seed + 10_007 * k


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto"
        )
    return torch.device(name)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain YAML/JSON values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def default_run_dir(algo: str, config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.env.replace('/', '_')}-{algo}-s{config.seed}-{stamp}"


def learner_threads(config: TrainConfig) -> int:
    """``torch_threads``, or for 0 this machine's cores shared by the workers (SB3's SAC takes
    every core; for big networks shoal should too, without workers oversubscribing them)."""
    if config.torch_threads > 0:
        return config.torch_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // config.num_workers)


def env_of(
    config: TrainConfig, env_fn: Callable[..., gym.Env] | None = None, *, training: bool = True
) -> str | Callable[..., gym.Env]:
    """What envs are made from: the user's function, else the config's id with its Atari
    preprocessing when that applies (``training=False``: whole games, unclipped rewards)."""
    return env_fn or env_source(config.env, config.atari_wrappers, training=training)


def spaces_of(env: str | Callable[..., gym.Env]) -> tuple[gym.Space, gym.Space]:
    probe = gym.make(env) if isinstance(env, str) else env()
    try:
        return probe.observation_space, probe.action_space
    finally:
        probe.close()


class Trainer:
    """Runs one algorithm on one vector env, writing a run directory."""

    def __init__(
        self,
        algo_class: type[Algorithm],
        config: TrainConfig,
        *,
        env_fn: Callable[..., gym.Env] | None = None,
        strategy: Strategy | None = None,
        progress: bool = True,
        stop: StopRequest | None = None,
    ) -> None:
        self.algo_class, self.config = algo_class, config
        self.env_fn = env_fn
        self.strategy = strategy or LocalStrategy()
        self.progress = progress
        # Checked once per env step; the CLI's signal handlers (or the supervisor) set it.
        self.stop = stop if stop is not None else StopRequest()
        self.device = resolve_device(config.device)
        torch.set_num_threads(learner_threads(config))
        torch.manual_seed(config.seed)  # the same initial weights on every worker and the server
        obs_space, action_space = spaces_of(env_of(config, env_fn))
        self.algo = algo_class(config, obs_space, action_space, self.device, self.strategy)
        self.strategy.watch(self.algo.modules(), config.nan_policy)  # no NaN gradient is ever applied
        if self.strategy.rank > 0:
            torch.manual_seed(self.strategy.worker_seed(config.seed))  # but its own sampling stream
        self.env_steps = 0
        self.boundary = 0  # index of the last checkpoint boundary
        self.run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(algo_class.name, config)

    def env_worker_share(self) -> int | str:
        """Env worker processes by default: one per core, shared among the training workers."""
        if self.strategy.world_size == 1:
            return "auto"
        return max(1, (os.cpu_count() or 1) // self.strategy.world_size)

    @property
    def checkpoint_every(self) -> int:
        c = self.config
        return c.checkpoint_every if c.checkpoint_every > 0 else max(1, c.total_steps // 10)

    # -- checkpoints ---------------------------------------------------------------------
    @property
    def keeps_own_state(self) -> bool:
        """Whether this worker saves a checkpoint at each boundary: the chief, and every worker
        of a lockstep group, whose replay buffer, random streams and (param-avg) weights are
        its own. Resumed or rebuilt, such a group then goes on bitwise as if uninterrupted."""
        return self.strategy.is_chief or self.strategy.in_lockstep

    def own_checkpoints(self) -> Path:
        """The chief's checkpoints are the run's; worker k's own are in ``checkpoints/rank-k``."""
        directory = self.run_dir / "checkpoints"
        return directory if self.strategy.is_chief else directory / f"rank-{self.strategy.rank}"

    def save_checkpoint(self) -> Path:
        arrays, meta = self.checkpoint_state()
        keep = self.config.keep_checkpoints
        return ckpt.save(self.own_checkpoints(), self.env_steps, arrays, meta, keep=keep)

    def save_best(self, score: dict[str, float]) -> Path:
        """Keep the current weights as the best so far (``score``: the evaluation that found them)."""
        arrays, meta = self.checkpoint_state()
        meta["best"] = score
        return ckpt.save_best(self.run_dir / "checkpoints", self.env_steps, arrays, meta)

    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, JSON values) of a checkpoint: weights, optimizers, the algorithm's extra state, RNG."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"algo": self.algo_class.name, "config": config_dict(self.config)}
        for name, module in self.algo.modules().items():
            arrays.update(ckpt.module_tensors(f"model/{name}", module))
        optim_meta = {}
        for name, optimizer in self.algo.optimizers().items():
            tensors, optim_meta[name] = ckpt.optimizer_state(f"optim/{name}", optimizer)
            arrays.update(tensors)
        extra_arrays, extra_meta = self.algo.extra_state()
        arrays.update({f"extra/{k}": v for k, v in extra_arrays.items()})
        stats_arrays, stats_meta = self.algo.statistics_state()
        arrays.update({f"norm/{k}": v for k, v in stats_arrays.items()})
        strategy_arrays, strategy_meta = self.strategy.state()
        arrays.update({f"strategy/{k}": v for k, v in strategy_arrays.items()})
        arrays["rng/torch"] = torch.get_rng_state().numpy()
        meta.update(
            optimizers=optim_meta,
            extra=extra_meta,
            normalizer=stats_meta,
            strategy=strategy_meta,
            updates=self.algo.updates,
            boundary=self.boundary,
            env_steps=self.env_steps,
        )
        return arrays, meta

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the run from checkpoint ``path`` (a worker of a lockstep group: from its own
        checkpoint of the same boundary, if it has one)."""
        path = ckpt.resolve(path)
        arrays, meta, own = self._read_checkpoint(path)
        ckpt.check_run(meta, own or path)
        if meta.get("algo") != self.algo_class.name:
            raise ckpt.CheckpointError(
                f"{path} holds a {meta.get('algo')} checkpoint, not {self.algo_class.name}"
            )
        try:  # a checkpoint of another network size, env or version: one clear line, not a traceback
            for name, module in self.algo.modules().items():
                ckpt.load_module(f"model/{name}", module, arrays)
            for name, optimizer in self.algo.optimizers().items():
                ckpt.load_optimizer(f"optim/{name}", optimizer, arrays, meta["optimizers"][name])
            extra = ckpt.under(arrays, "extra")
            self.algo.load_extra_state(extra, meta["extra"])
            if "normalizer" in meta:  # (a checkpoint from before normalisation existed has none)
                stats = ckpt.under(arrays, "norm")
                self.algo.load_statistics(stats, meta["normalizer"])
            torch.set_rng_state(torch.from_numpy(arrays["rng/torch"].copy()))
            mine = own is not None or self.strategy.is_chief  # not another worker's residuals
            self.strategy.load_state(ckpt.under(arrays, "strategy"), meta.get("strategy", {}), mine=mine)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            text = " ".join(f"{type(e).__name__}: {e}".split())
            raise ckpt.CheckpointError(
                f"{path} does not fit this {self.algo_class.name} run ({text[:300]})"
            ) from None
        if own is None and self.strategy.rank > 0:  # rank 0's stream: every worker needs its own
            torch.manual_seed(derived_seed(self.strategy.worker_seed(self.config.seed), meta["boundary"]))
        self.algo.updates = meta["updates"]
        self.boundary = meta["boundary"]
        self.env_steps = meta["env_steps"]

    def _read_checkpoint(self, chief: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], Path | None]:
        """(arrays, meta, own): the chief's checkpoint ``chief``, or for a worker of a lockstep
        group its own checkpoint of the same boundary (``own``, its path). Without a whole one
        (the worker died before saving it; or it saved the next one while the chief died, and
        pruned this one's replay) the worker resumes from the chief's state, said in a warning."""
        if self.strategy.is_chief or not self.keeps_own_state:
            return (*ckpt.load(chief), None)
        own = self.own_checkpoints() / chief.name
        if own.is_file():
            arrays, meta = ckpt.load(own)
            if ckpt.PRUNED not in meta:
                return arrays, meta, own
        log.warning(
            f"worker {self.strategy.rank} has no checkpoint of its own at {chief.name} (in"
            f" {own.parent}): it resumes from worker 0's replay buffer, random streams and weights,"
            " and the run goes on, though not bitwise as it would have"
        )
        return (*ckpt.load(chief), None)

    # -- the loop ------------------------------------------------------------------------
    def train(
        self,
        *,
        resume: str | Path | None = None,
        stop_after_checkpoints: int | None = None,
        on_update: Callable[[Trainer], bool] | None = None,
    ) -> dict[str, Any]:
        """Train to ``total_steps``; return the summary (final evaluation included).

        ``on_update`` is called after every update; returning True stops training early.
        ``stop_after_checkpoints`` ends the run like a crash after that many boundaries.
        """
        self._open(resume)
        callbacks = self._callbacks(on_update, stop_after_checkpoints)
        c, algo = self.config, self.algo
        self.timing = UpdateTiming()  # the run's clock starts here, as the loop does
        try:
            self.start_episodes()
            while self.env_steps < c.total_steps:
                if self.stop and not self.strategy.in_lockstep:  # between two steps: saved as it is
                    break
                actions = algo.act(self.obs)
                next_obs, rewards, terminated, truncated, infos = self.envs.step(actions)
                # Every worker counts the group's steps: its own times the workers (exact in
                # lockstep, an estimate for asynchronous workers, who run at their own pace).
                self.env_steps += c.num_envs * self.strategy.world_size
                ended = terminated | truncated
                next_obs, rewards, valid = self._screen(next_obs, rewards, ended, infos)
                algo.observe(self.obs, rewards, ended, valid)  # normalisation statistics (raw values)
                algo.record(rewards, terminated, truncated, next_obs, valid, self.env_steps)
                self.episodes.step(rewards, valid, ended, game_scores(infos))
                self.autoreset = ended
                self.obs = next_obs
                if algo.ready():
                    with self.timing:
                        self.update_metrics = algo.update(next_obs, self.env_steps)
                        algo.merge_statistics()  # used from the next rollout (or sampled batch) on
                    if any(cb.after_update(self) for cb in callbacks):  # the first True stops here
                        break
                for cb in callbacks:
                    cb.after_step(self)
            self.strategy.finish()
            if self.env_steps >= c.total_steps and not self.stop:
                for cb in callbacks:
                    cb.at_end(self)
        except CrashAfterCheckpoints:
            return {"stopped_at": self.env_steps}
        except guards.NonFiniteError as e:
            # Nothing is saved after a NaN: the checkpoints on disk hold the last finite weights.
            e.env_steps, e.context = self.env_steps, True
            e.worker = self.strategy.rank if self.strategy.world_size > 1 else None
            e.checkpoint = ckpt.latest(self.run_dir / "checkpoints")
            raise
        finally:
            self.logger.close()
            self.envs.close()
        return self._finish()

    def _callbacks(
        self, on_update: Callable[[Trainer], bool] | None, crash_after: int | None
    ) -> list[Callback]:
        """The periodic work, in the order it runs after an update."""
        callbacks: list[Callback] = [UserHook(on_update)] if on_update else []
        callbacks.append(StopVote())
        if self.config.eval_every > 0 and self.strategy.is_chief:  # no collective in it: the others go on
            callbacks.append(PeriodicEvaluation(self))  # before the boundary: resumed from it, it was done
        callbacks += [CheckpointBoundaries(crash_after), MetricsRow(self)]
        faults = FaultInjection.from_environment(self.strategy.rank)
        return [faults, *callbacks] if faults else callbacks

    def _open(self, resume: str | Path | None) -> None:
        """Load the checkpoint, agree on weights with the group, open the run dir, envs and logs."""
        c = self.config
        if resume is not None:
            self.load_checkpoint(resume)
        # e.g. rank 0's weights for all; the strategy also learns where the statistics to merge are
        self.strategy.start(self.algo.modules(), self.algo.optimizers(), self.algo.normalizer)
        if self.strategy.is_chief:  # a new run claims its directory (mp/ray: the launcher did)
            fresh = resume is None and self.env_steps == 0 and c.backend == "local"
            self.run_dir = choose_run_dir(self.run_dir, explicit=bool(c.run_dir), claim=fresh)
            ckpt.write_text_atomic(  # a run killed at any moment can still be resumed
                self.run_dir / "config.yaml",
                yaml.safe_dump({"algo": self.algo_class.name, **config_dict(c)}, sort_keys=False),
            )
        self.seed = self.strategy.worker_seed(c.seed)
        self.envs = make_vec(
            env_of(c, self.env_fn),
            c.num_envs,
            seed=self.seed,
            vectorization=c.vectorization,
            num_workers=c.env_workers or self.env_worker_share(),
            on_error=c.on_env_error,  # type: ignore[arg-type]
            step_timeout=c.step_timeout or None,
            process_overhead_s=TRAINING_PROCESS_OVERHEAD_S,
        )
        self._warn_if_boundaries_cut_episodes()
        self.faults = EnvFaults(c.max_restarts)
        self.screen = guards.EnvGuard(c.num_envs, c.nan_policy)  # NaN/inf from the envs: raise or quarantine
        self.episodes = Episodes(c.num_envs, games=reports_games(env_of(c, self.env_fn)))
        self.update_metrics: dict[str, float] = {}
        self.best_eval: dict[str, Any] | None = None  # the best periodic evaluation (--eval-every)
        chief = self.strategy.is_chief
        self.logger = RunLogger(
            self.run_dir if chief else None,
            c.total_steps,
            progress=self.progress and chief,
            start_step=self.env_steps,
        )

    def _warn_if_boundaries_cut_episodes(self) -> None:
        """Every boundary cuts the episodes in progress: say so when that caps them all."""
        try:
            limit = None if self.env_fn else gym.spec(self.config.env).max_episode_steps
        except gym.error.Error:
            limit = None
        per_env = self.checkpoint_every // (self.config.num_envs * self.strategy.world_size)
        cuts = self.checkpoint_every < self.config.total_steps
        if limit and per_env < limit and cuts and self.strategy.is_chief:
            log.warning(
                f"--checkpoint-every {self.checkpoint_every} gives each env {per_env} steps between "
                f"checkpoints, fewer than an episode's {limit}: every checkpoint starts fresh episodes "
                f"(for an exact resume), so longer ones never finish nor show in the logged returns "
                f"(see episodes_cut); raise --checkpoint-every"
            )

    def start_episodes(self) -> None:
        """Every env starts a fresh episode, seeded by the last checkpoint boundary."""
        obs, infos = self.envs.reset(seed=derived_seed(self.seed, self.boundary))
        self.obs = self.screen.after_reset(obs)
        self.faults.lost_envs(infos, self.envs)  # counted; every episode starts afresh here anyway
        self.autoreset = np.zeros(self.config.num_envs, dtype=bool)
        self.episodes.cut()
        self.algo.normalizer.new_episodes()  # discounted returns restart with the episodes

    def _screen(
        self, next_obs: Any, rewards: np.ndarray, ended: np.ndarray, infos: dict[str, Any]
    ) -> tuple[Any, np.ndarray, np.ndarray]:
        """Which envs' steps count: not the reset step of an autoreset, not a restarted env's,
        not a quarantined NaN's. Cut episodes end here, as truncations."""
        valid = ~self.autoreset
        lost = self.faults.lost_envs(infos, self.envs)
        if lost is not None:  # envs that failed and were restarted: their episodes end here
            if self.faults.exhausted:
                self.algo.on_new_episodes()  # mid-episode: a resume starts fresh ones
                raise self.faults.error(self.save_checkpoint() if self.strategy.is_chief else None)
            self.algo.cut_episodes(lost)
            self.episodes.cut(lost)
            valid &= ~lost
        if self.screen.active or not self.screen.finite(next_obs, rewards):
            next_obs, rewards, skipped = self.screen.screen(next_obs, rewards)  # or NonFiniteError
            self.algo.cut_episodes(skipped)  # not learned from, nor logged, until the episode ends
            self.episodes.cut(skipped)
            valid &= ~skipped
            self.screen.episodes_ended(ended if lost is None else ended | lost)
        return next_obs, rewards, valid

    def _finish(self) -> dict[str, Any]:
        """The final checkpoint, evaluation and summary (the chief's); a stopped run has no summary."""
        c, chief = self.config, self.strategy.is_chief  # (the wall time: the loop, not what follows)
        summary: dict[str, Any] = {"env_steps": self.env_steps, "wall_time": self.timing.since_start()}
        if self.keeps_own_state:
            # Episodes in progress end here (a resume starts fresh ones): drop partial n-step
            # transitions, as at a boundary, so that the checkpoint can be resumed.
            self.algo.on_new_episodes()
            self.save_checkpoint()
        if chief:
            play = env_of(c, self.env_fn, training=False)
            summary.update(evaluate(self.algo, play, c.eval_episodes, c.seed, self.stop))
            if self.best_eval is not None:
                best = self.best_eval
                summary.update(best_eval_return=best["eval_return"], best_eval_env_steps=best["env_steps"])
        summary.update(self.summary_extra())
        if self.stop:  # no summary.json: the run is not finished (a resume finishes it)
            return {**summary, "stopped": self.stop.signal}
        if chief:
            ckpt.write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary

    def summary_extra(self) -> dict[str, Any]:
        """What a subclass adds to the summary (the decoupled loop: its trajectory counts)."""
        return {}


class UpdateTiming:
    """Seconds spent in updates, averaged over those since the last metrics row."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds, self.updates = 0.0, 0

    def __enter__(self) -> UpdateTiming:
        self.begin = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self.begin
        self.updates += 1

    def since_start(self) -> float:
        return time.perf_counter() - self.started

    def drain(self) -> dict[str, float]:
        if not self.updates:
            return {}
        row = {"update_seconds": self.seconds / self.updates}
        self.seconds, self.updates = 0.0, 0
        return row


def evaluate(
    algo: Algorithm,
    env: str | Callable[..., gym.Env],
    episodes: int,
    seed: int,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Greedy (deterministic) returns of ``episodes`` episodes on fresh, separately seeded envs.

    Episode k plays on seed ``seed + EVAL_SEED_OFFSET + k``. Up to ``EVAL_ENVS`` episodes play
    at once, one env each, with one batched forward pass per step: one at a time, each step
    paid a forward pass of its own, and the periodic evaluations took ~45% of a 45 s IMPALA
    CartPole run. ``env``: an id or a function; for Atari, ``env_of(config, training=False)``,
    whose episodes are whole games with raw rewards. A ``stop`` request ends it early (with
    the episodes completed so far)."""
    make = (lambda: gym.make(env)) if isinstance(env, str) else env
    envs: list[gym.Env] = []
    returns: dict[int, float] = {}
    try:
        for _ in range(min(episodes, EVAL_ENVS)):
            envs.append(make())  # (appended one by one: a failing make closes those made)
        playing: dict[int, list] = {}  # env -> [episode, observation, return so far]
        for i in range(len(envs)):
            playing[i] = [i, envs[i].reset(seed=seed + EVAL_SEED_OFFSET + i)[0], 0.0]
        started = len(envs)
        while playing and not stop:
            order = list(playing)
            actions = algo.predict(np.stack([np.asarray(playing[i][1]) for i in order]))
            for i, action in zip(order, actions):
                obs, reward, terminated, truncated, _ = envs[i].step(action)
                play = playing[i]
                play[1], play[2] = obs, play[2] + float(reward)
                if not (terminated or truncated):
                    continue
                returns[play[0]] = play[2]
                if started < episodes:
                    playing[i] = [started, envs[i].reset(seed=seed + EVAL_SEED_OFFSET + started)[0], 0.0]
                    started += 1
                else:
                    del playing[i]
    finally:
        for one in envs:
            one.close()
    return _returns([returns[k] for k in sorted(returns)])


def _returns(results: list[float]) -> dict[str, Any]:
    return {
        "mean_return": float(np.mean(results)) if results else math.nan,
        "std_return": float(np.std(results)) if results else math.nan,
        "episodes": len(results),
    }

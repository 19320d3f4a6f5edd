"""The learner loop of decoupled actors (IMPALA, APPO): trajectories in, weights out.

    actors (processes or Ray actors)           learner (this loop)
    env -> policy copy -> trajectory slot  ==>  copy out, free the slot, drop if too stale
                 ^                              batch of B -> algorithm.learn -> publish
                 +------- weight buffer (versioned) <-----------------------+

Everything a run directory holds works as in :mod:`shoal.training.trainer`, whose
:class:`Trainer` this extends: ``config.yaml``, ``metrics.jsonl`` and progress, checkpoints
every ``checkpoint_every`` env steps and at the end, the final greedy evaluation,
``--eval-every``, a stop request (Ctrl-C) that saves and returns, and ``--resume``. Env
steps count every trajectory the learner received (learned from or dropped as too stale).

A resume is not exact, unlike the step-by-step loop's: the learner continues from the
checkpoint's weights, optimizer, statistics and counts, but the actors start fresh episodes
(seeded by the checkpoint boundary) and their timing decides which policy version acts
where, as it does in any run.

The actors run in an actor pool chosen by ``--backend``: processes on this machine
(:mod:`shoal.actors.pool`) or Ray actors on any node (:mod:`shoal.actors.ray_pool`); the loop
only publishes weights, receives slot indices, reads and releases slots, and closes the pool.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from shoal import guards
from shoal.actors.actor import policy_vector
from shoal.actors.pool import ActorFailed, ActorPool, MpActors, Produced
from shoal.actors.shared import TrajectoryLayout
from shoal.algos.base import Trajectories
from shoal.run import checkpoint as ckpt
from shoal.run.logger import RunLogger
from shoal.run.rundir import choose_run_dir
from shoal.training.callbacks import (
    Callback,
    CheckpointBoundaries,
    CrashAfterCheckpoints,
    PeriodicEvaluation,
    UserHook,
)
from shoal.training.trainer import Trainer, UpdateTiming, config_dict

RECEIVE_WAIT_S = 0.1  # longest wait for a trajectory before the loop looks at a stop request again


class DecoupledTrainer(Trainer):
    """One learner fed by ``num_actors`` actors (processes, or Ray actors); see the module docstring."""

    def train(
        self,
        *,
        resume: str | Path | None = None,
        stop_after_checkpoints: int | None = None,
        on_update: Callable[[Trainer], bool] | None = None,
    ) -> dict[str, Any]:
        c, algo = self.config, self.algo
        if resume is not None:  # weights, optimizer, statistics, counts; the actors start afresh
            self.load_checkpoint(resume)
        self._open_learner(fresh=resume is None)
        callbacks: list[Callback] = [UserHook(on_update)] if on_update else []
        if c.eval_every > 0:
            callbacks.append(PeriodicEvaluation(self))
        callbacks.append(CheckpointBoundaries(stop_after_checkpoints))
        self.timing = UpdateTiming()
        self.actors = self._actor_pool()
        try:
            self.version = self.actors.publish(policy_vector(algo.net, algo.normalizer))
            self.actors.start()
            while self.env_steps < c.total_steps and not self.stop:
                batch = self._collect(c.batch_trajectories)
                if batch is None:  # stopped while waiting
                    break
                with self.timing:
                    self.update_metrics = algo.learn(batch, self.env_steps)
                    if algo.normalizer.active:  # what this batch counted: used from the next one on
                        algo.normalizer.merge([algo.normalizer.take_fresh()])
                self.version = self.actors.publish(policy_vector(algo.net, algo.normalizer))
                if any(cb.after_update(self) for cb in callbacks):
                    break
                self._metrics_row()
            self.produced = self.actors.close()  # before the final evaluation: its CPU is the learner's
            if self.env_steps >= c.total_steps and not self.stop:
                for cb in callbacks:
                    cb.at_end(self)
        except CrashAfterCheckpoints:
            return {"stopped_at": self.env_steps}
        except ActorFailed as e:
            # An actor raised, or more were lost than --max-restarts allows: the run stops. The
            # learner is between two updates (an actor's loss shows in a receive): saved whole.
            saved = self.save_checkpoint()
            raise ActorFailed(f"{e}; the run stopped, resume it from checkpoint {saved}") from None
        except guards.NonFiniteError as e:
            e.env_steps, e.context = self.env_steps, True
            e.checkpoint = ckpt.latest(self.run_dir / "checkpoints")
            raise
        finally:
            self.produced = self.actors.close()
            self.logger.close()
        return self._finish()

    def start_episodes(self) -> None:
        """Checkpoint boundaries cut no episodes here: the actors' envs run on (no exact resume)."""

    def summary_extra(self) -> dict[str, Any]:
        p: Produced = self.produced
        return {
            "trajectories_sent": sum(p.sent),
            "trajectories_received": sum(p.received),
            "trajectories_learned": self.learned,
            "trajectories_dropped_stale": self.dropped,
            "trajectories_unused_at_end": sum(p.received) - self.learned - self.dropped,
            "trajectories_consistent": p.consistent,
            "trajectories_lost_with_actors": self.actors.lost_in_flight,
            "actors_replaced": self.actors.replaced,
            "updates": self.algo.updates,
            **({"actor_nodes": self.actors.nodes} if self.actors.nodes else {}),
        }

    # -- inside -----------------------------------------------------------------------------
    def _open_learner(self, fresh: bool) -> None:
        c = self.config
        self.run_dir = choose_run_dir(self.run_dir, explicit=bool(c.run_dir), claim=fresh)
        ckpt.write_text_atomic(
            self.run_dir / "config.yaml",
            yaml.safe_dump({"algo": self.algo_class.name, **config_dict(c)}, sort_keys=False),
        )
        self.logger = RunLogger(
            self.run_dir, c.total_steps, progress=self.progress, start_step=self.env_steps
        )
        self.update_metrics: dict[str, float] = {}
        self.best_eval: dict[str, Any] | None = None
        self.pending: list[dict[str, np.ndarray]] = []  # received, not yet in a batch
        self.returns = np.zeros((c.num_actors, c.num_envs))  # discounted, for --normalize-reward
        self.learned = self.dropped = 0
        self.lags: list[int] = []  # of each trajectory received since the last metrics row
        self.backlogs: list[int] = []
        self.episode_returns: list[float] = []
        self.episode_lengths: list[float] = []
        self.row_time, self.row_steps, self.row_sent = time.perf_counter(), self.env_steps, 0
        self.last_row = self.env_steps

    def _actor_pool(self) -> ActorPool:
        """Actor processes on this machine (``--backend mp``) or Ray actors (``--backend ray``)."""
        c, algo = self.config, self.algo
        discrete = algo.net.discrete
        layout = TrajectoryLayout(
            length=c.rollout_length,
            num_envs=c.num_envs,
            obs_shape=tuple(algo.obs_space.shape or ()),
            obs_dtype=np.dtype(algo.obs_space.dtype or np.float32).str,
            action_shape=() if discrete else tuple(algo.action_space.shape),
            action_dtype=np.dtype(np.int64 if discrete else np.float32).str,
        )
        if c.backend == "ray":
            from shoal.actors.ray_pool import RayActors

            return RayActors(
                self.algo_class.name,
                c,
                layout,
                num_actors=c.num_actors,
                slots_per_actor=c.slots_per_actor,
                boundary=self.boundary,
                max_restarts=c.max_restarts,
                hang_timeout=c.hang_timeout,
            )
        size = len(policy_vector(algo.net, algo.normalizer))
        return MpActors(
            self.algo_class.name,
            c,
            layout,
            size,
            num_actors=c.num_actors,
            slots_per_actor=c.slots_per_actor,
            boundary=self.boundary,
            max_restarts=c.max_restarts,
            hang_timeout=c.hang_timeout,
        )

    def _collect(self, count: int) -> Trajectories | None:
        """The next ``count`` trajectories fresh enough to learn from, as one batch (None: stopped)."""
        ring, c = self.actors.ring, self.config
        steps = c.rollout_length * c.num_envs
        self.backlogs.append(self.actors.backlog())  # what waited while the learner was away
        while len(self.pending) < count:
            if self.stop:
                return None
            for actor in self.actors.take_replaced():  # its successor's episodes start afresh
                self.returns[actor] = 0.0
            for slot in self.actors.receive(RECEIVE_WAIT_S):
                arrays, version = ring.slot(slot), ring.header(slot)["version"]
                lag = self.version - version
                self.env_steps += steps
                self._track_returns(ring.owner(slot), arrays)
                ended = ~np.isnan(arrays["episode_return"])
                self.episode_returns += arrays["episode_return"][ended].tolist()
                self.episode_lengths += arrays["episode_length"][ended].tolist()
                if lag > c.max_policy_lag:
                    self.dropped += 1
                else:
                    self.pending.append({k: v.copy() for k, v in arrays.items()})
                    self.lags.append(lag)
                    if self.algo.normalizer.on_obs:
                        self.algo.normalizer.observe(arrays["obs"][:-1][arrays["valid"]])
                self.actors.release(slot)
        taken, self.pending = self.pending[:count], self.pending[count:]
        self.learned += len(taken)
        return self._batch(taken)

    def _track_returns(self, actor: int, arrays: dict[str, np.ndarray]) -> None:
        """``--normalize-reward``: each actor's envs' discounted returns, step by step, as the
        step-by-step loop tracks its own envs' (every trajectory of an actor arrives in order)."""
        n = self.algo.normalizer
        if not n.on_reward:
            return
        n.returns = self.returns[actor]
        done = arrays["terminated"] | arrays["truncated"]
        for t in range(len(done)):
            n.track(arrays["rewards"][t], done[t], arrays["valid"][t])
        self.returns[actor] = n.returns

    def _batch(self, trajectories: list[dict[str, np.ndarray]]) -> Trajectories:
        def joined(name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
            x = torch.from_numpy(np.concatenate([t[name] for t in trajectories], axis=1))
            return x.to(self.device, dtype=dtype)

        return Trajectories(
            obs=joined("obs"),
            actions=joined("actions"),
            behaviour_logprobs=joined("logprobs"),
            rewards=joined("rewards"),
            terminated=joined("terminated", torch.float32),
            truncated=joined("truncated", torch.float32),
            valid=joined("valid"),
        )

    def _metrics_row(self) -> None:
        """Every ``log_every`` env steps: learner and actor throughput, lag, queue fill, drops."""
        c = self.config
        if self.env_steps - self.last_row < c.log_every and self.env_steps < c.total_steps:
            return
        self.last_row = self.env_steps
        now = time.perf_counter()
        wall = max(now - self.row_time, 1e-9)
        steps = c.rollout_length * c.num_envs
        sent = self.actors.sent()
        row: dict[str, float] = {
            "wall_time": self.timing.since_start(),
            "sps": (self.env_steps - self.row_steps) / wall,  # received by the learner
            "actor_sps": (sent - self.row_sent) * steps / wall,  # produced by the actors
            "queue_fill": float(np.mean(self.backlogs or [0])) / self.actors.num_slots,
            "learner_busy": self.timing.seconds / wall,  # the share of the row's time spent learning
            "trajectories_dropped": float(self.dropped),
            "actors_replaced": float(self.actors.replaced),
            "policy_version": float(self.version),
            **self.update_metrics,
        }
        if self.lags:
            row.update(policy_lag=float(np.mean(self.lags)), policy_lag_max=float(max(self.lags)))
            self.logger.histogram("policy_lag", self.lags, self.env_steps)
        if self.episode_returns:
            row.update(
                episode_return=float(np.mean(self.episode_returns)),
                episode_length=float(np.mean(self.episode_lengths)),
            )
        row.update(self.timing.drain())
        self.lags, self.backlogs, self.episode_returns, self.episode_lengths = [], [], [], []
        self.row_time, self.row_steps, self.row_sent = now, self.env_steps, sent
        self.logger.log(self.env_steps, {k: v for k, v in row.items() if not math.isnan(v)})

"""Periodic work of the training loop, handed control at fixed points (as SB3's callbacks are).

The loop (``shoal.training.trainer``) calls every callback's ``after_update`` after each
update, in order, and stops training when one returns True; ``after_step`` after every env
step; ``at_end`` once when training reached its total steps. Checkpoint boundaries, the
lockstep stop vote, metrics rows, periodic evaluation, the user's hook and the test suite's
fault injection are all callbacks, not branches inside the loop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.run import checkpoint as ckpt

if TYPE_CHECKING:
    from shoal.training.trainer import Trainer

log = logging.getLogger("shoal")


class Callback:
    """Every hook does nothing; a callback overrides what it needs."""

    def after_update(self, trainer: Trainer) -> bool:
        """Called after every update; True stops training here."""
        return False

    def after_step(self, trainer: Trainer) -> None:
        """Called after every env step (and after the update it may have triggered)."""

    def at_end(self, trainer: Trainer) -> None:
        """Called once when training reached ``total_steps`` (not when stopped), with the final
        weights (after the strategy's last exchange), before the final checkpoint."""


class UserHook(Callback):
    """``Trainer.train(on_update=f)``: ``f(trainer)`` after every update; True stops training."""

    def __init__(self, fn: Callable[[Trainer], bool]) -> None:
        self.fn = fn

    def after_update(self, trainer: Trainer) -> bool:
        return bool(self.fn(trainer))


class StopVote(Callback):
    """Workers in lockstep stop after the same update, when any of them was asked to."""

    def after_update(self, trainer: Trainer) -> bool:
        strategy, stop = trainer.strategy, trainer.stop
        if strategy.in_lockstep and strategy.mean(float(bool(stop))) > 0:
            stop.request(stop.signal or "stop")
            return True
        return False


class CrashAfterCheckpoints(Exception):
    """Raised by :class:`CheckpointBoundaries` to end a run as abruptly as a crash would (tests)."""


class CheckpointBoundaries(Callback):
    """Every ``checkpoint_every`` env steps: save, then every env starts a fresh, seeded episode.

    Cutting the episodes at a boundary is what makes a resume exact (see the trainer's
    docstring). ``crash_after``: after that many boundaries the run ends at once, without a
    final checkpoint or evaluation, as if the machine had died (tests of resume use it).
    """

    def __init__(self, crash_after: int | None = None) -> None:
        self.crash_after = crash_after
        self.passed = 0

    def after_update(self, trainer: Trainer) -> bool:
        c = trainer.config
        due = trainer.env_steps >= (trainer.boundary + 1) * trainer.checkpoint_every
        if not due or trainer.env_steps >= c.total_steps:  # the end has its own checkpoint
            return False
        trainer.boundary += 1
        trainer.algo.on_new_episodes()
        if trainer.keeps_own_state:
            trainer.save_checkpoint()
        self.passed += 1
        if self.crash_after is not None and self.passed >= self.crash_after:
            raise CrashAfterCheckpoints
        trainer.start_episodes()
        return False


class PeriodicEvaluation(Callback):
    """Every ``eval_every`` env steps (and at the end): a greedy evaluation, logged, and the best
    weights so far kept in ``checkpoints/best/`` (as SB3's ``EvalCallback`` keeps ``best_model``).

    Run by the chief only, on its own env, outside every collective: the other workers just
    wait for it at their next exchange. Each evaluation plays the same ``periodic_eval_episodes``
    seeds (so that two evaluations compare the policies, not their luck), which no final
    evaluation (``eval_episodes`` <= MAX_EVAL_EPISODES seeds from the run's) ever plays: the best
    checkpoint is not scored on the episodes ``shoal eval --best`` then reports. Acting greedily
    draws from no random stream of training, so a run with evaluations learns bitwise the same.
    It runs before the checkpoint boundary of the same update, so a run resumed from that
    checkpoint does not evaluate again there; the best score is read back from the best
    checkpoint, so a resumed run never replaces a better best with a worse one.
    """

    def __init__(self, trainer: Trainer) -> None:
        from shoal.config import MAX_EVAL_EPISODES
        from shoal.training.trainer import env_of, evaluate

        self.evaluate, self.seed = evaluate, trainer.config.seed + MAX_EVAL_EPISODES
        self.env_of = env_of
        every = trainer.config.eval_every
        self.due = (trainer.env_steps // every + 1) * every  # the first multiple not evaluated yet
        trainer.best_eval = read_best(trainer.run_dir)

    def after_update(self, trainer: Trainer) -> bool:  # the weights change only in updates
        if self.due <= trainer.env_steps < trainer.config.total_steps:  # the end: at_end, final weights
            self.run(trainer)
        return False

    def at_end(self, trainer: Trainer) -> None:
        self.run(trainer)

    def run(self, trainer: Trainer) -> None:
        c = trainer.config
        self.due = (trainer.env_steps // c.eval_every + 1) * c.eval_every
        start = time.perf_counter()
        result = self.evaluate(
            trainer.algo,
            self.env_of(c, trainer.env_fn, training=False),
            c.periodic_eval_episodes,
            self.seed,
            trainer.stop,
        )
        if trainer.stop:  # cut short: neither a score nor a best
            return
        mean, std = result["mean_return"], result["std_return"]
        row = {"eval_return": mean, "eval_return_std": std, "eval_seconds": time.perf_counter() - start}
        trainer.logger.log(trainer.env_steps, row, progress=False)  # its time counts in the run's sps
        best = trainer.best_eval
        if best is None or mean > best["eval_return"]:
            trainer.best_eval = {
                "eval_return": mean,
                "eval_return_std": std,
                "episodes": result["episodes"],
                "env_steps": trainer.env_steps,
            }
            trainer.save_best(trainer.best_eval)


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """The score of a run's best checkpoint (None: none yet, or one that cannot be read)."""
    path = ckpt.best(run_dir)
    if path is None:
        return None
    try:
        score = ckpt.load(path)[1]["best"]
        float(score["eval_return"])
        return score
    except (ckpt.CheckpointError, KeyError, TypeError, ValueError) as e:
        log.warning(f"{path} cannot be read ({e}): the next evaluation replaces it")
        return None


class MetricsRow(Callback):
    """Every ``log_every`` env steps (and at the end): one row of metrics, written by the chief."""

    def __init__(self, trainer: Trainer) -> None:
        self.last = trainer.env_steps
        self.start_time, self.start_steps = time.perf_counter(), trainer.env_steps

    def after_step(self, trainer: Trainer) -> None:
        c, strategy = trainer.config, trainer.strategy
        if trainer.env_steps - self.last < c.log_every and trainer.env_steps < c.total_steps:
            return
        self.last = trainer.env_steps
        wall = time.perf_counter() - self.start_time
        own_steps = (trainer.env_steps - self.start_steps) / strategy.world_size
        worker_sps = strategy.worker_sps(own_steps / max(wall, 1e-9))  # a collective in lockstep
        row = {
            "wall_time": wall,
            "sps": sum(worker_sps),
            **trainer.update_metrics,
            **strategy.metrics(),
            **trainer.faults.metrics(),
        }
        if len(worker_sps) > 1:
            row.update({f"sps_worker_{r}": v for r, v in enumerate(worker_sps)})
        if c.nan_policy == "skip":
            row["nonfinite_skipped_steps"] = float(trainer.screen.skipped_steps)
            row["nonfinite_skipped_updates"] = float(strategy.nonfinite_skipped)
        row.update(trainer.timing.drain())
        row.update(trainer.episodes.drain())
        trainer.logger.log(trainer.env_steps, row)


FAULTS_VARIABLE = "SHOAL_TEST_FAULTS"


class FaultInjection(Callback):
    """Test-suite faults at deterministic points: signal this worker after env step N, or
    this actor after it sent its N-th trajectory.

    Read from the ``SHOAL_TEST_FAULTS`` environment variable (JSON), so that a test can
    reach workers started by ``shoal train`` on any backend::

        {"dir": "/tmp/claims", "faults": [{"at_steps": 12000, "signal": "SIGKILL", "ranks": [1]},
                                          {"at_trajectories": 5, "signal": "SIGSTOP", "ranks": [0]}]}

    Fault ``j`` fires once per run, in the first worker (of ``ranks``, default any) to finish
    an update at or past ``at_steps`` env steps (for an actor: the first actor to send its
    ``at_trajectories``-th trajectory): it claims ``dir/fault-<j>`` (created exclusively,
    holding its pid), then sends itself the signal. Replacements and rebuilt groups see the
    claim and do not fire it again.
    """

    def __init__(self, spec: dict[str, Any], rank: int) -> None:
        self.dir = Path(spec["dir"])
        self.faults = list(enumerate(spec["faults"]))
        self.rank = rank

    @staticmethod
    def spec_from_environment() -> dict[str, Any] | None:
        text = os.environ.get(FAULTS_VARIABLE)
        return json.loads(text) if text else None

    @classmethod
    def from_environment(cls, rank: int) -> FaultInjection | None:
        spec = cls.spec_from_environment()
        return cls(spec, rank) if spec else None

    def after_update(self, trainer: Trainer) -> bool:
        self._fire("at_steps", trainer.env_steps)
        return False

    def after_trajectories(self, sent: int) -> None:
        self._fire("at_trajectories", sent)

    def _fire(self, point: str, count: int) -> None:
        for j, fault in self.faults:
            if point not in fault or count < fault[point] or self.rank not in fault.get("ranks", [self.rank]):
                continue
            claim = self.dir / f"fault-{j}"
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            os.write(fd, f"{os.getpid()} {self.rank} {count}\n".encode())
            os.close(fd)
            os.kill(os.getpid(), signal.Signals[fault["signal"]])

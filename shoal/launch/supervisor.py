"""One supervisor for every backend: start the ranks, watch them, replace or rebuild, stop.

A *topology* says which ranks a run has (their role, the function each runs, whether a lost
one can be replaced while the others go on); a *backend* says how a rank is started, polled
and stopped (``mp``: a process here; ``ray``: an actor anywhere). The policy for what goes
wrong lives here, once:

- a rank that **raises** (a bug, a NaN stop) is not retried: it would raise again. Every
  rank is stopped and its error becomes the run's one line.
- a rank that **dies** (a signal, out of memory, its machine gone) or **hangs** (no sign of
  life for ``hang_timeout`` seconds, or for ``STARTUP_S`` after its start before its first
  sign: it is killed first) is *lost*. A replaceable rank (a
  worker that talks to a parameter server over its own link) is replaced by a new one that
  resumes from the chief's latest checkpoint while the others train on. Otherwise (a rank
  of one torch.distributed group, or the server) every rank stops and the group is
  rebuilt from that checkpoint. Both count against ``max_restarts``.
- a **stop request** (SIGINT/SIGTERM) is passed to every rank, which saves and returns; a
  rank that ends meanwhile is no reason to replace or rebuild anything.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.config import TrainConfig
from shoal.distributed.names import SERVER_STRATEGIES
from shoal.training.trainer import StopRequest

log = logging.getLogger("shoal")

# A rank's first sign of life may come this long after its start (``--hang-timeout`` applies
# from then on, if longer): importing torch took over 5 s on a loaded 2-core machine.
STARTUP_S = 120.0

Key = int | str  # a worker's rank, or "server"


class TrainingFailed(RuntimeError):
    """A rank failed for good: its own traceback is above, this says which and what is kept."""


class WorkerLost(TrainingFailed):
    """A rank that cannot be replaced in place died or hung: the group is rebuilt."""


@dataclass(frozen=True)
class Rank:
    """One rank of a topology."""

    key: Key
    role: str  # "worker" or "server" (a learner and its actors are next)
    fn: Callable[..., dict[str, Any]]  # what the rank runs; its keyword arguments come from the job
    replaceable: bool  # lost: replaced while the others go on (True), or the group is rebuilt

    @property
    def name(self) -> str:
        return "the server" if self.role == "server" else f"worker {self.key}"


@dataclass
class Topology:
    """The ranks of a run; ``chief`` writes the run directory and returns the summary."""

    ranks: list[Rank]
    chief: Key = 0

    @classmethod
    def of(cls, config: TrainConfig) -> Topology:
        """Workers, plus a parameter server for a3c and param-server (whose workers are replaceable)."""
        from shoal.launch.ranks import run_server, run_worker

        server = config.strategy in SERVER_STRATEGIES
        ranks = [Rank(k, "worker", run_worker, replaceable=server) for k in range(config.num_workers)]
        if server:
            ranks.append(Rank("server", "server", run_server, replaceable=False))
        return cls(ranks)


@dataclass
class Exit:
    """How a rank ended: ``how`` for the one-line error ("was killed by SIGKILL", "raised ...")."""

    how: str
    killed: bool  # by a signal, a lost actor or a hang: not the rank's own doing
    detail: str = ""  # the rank's traceback, shown when it is to blame (a peer's loss needs none)


class Backend(Protocol):
    """Where ranks run. Every method returns at once; the supervisor polls."""

    settle_s: float  # how long a killed rank may take to show as killed after its peers failed

    def begin(self, topology: Topology) -> str:
        """Prepare an attempt (a group of ranks); return the rendezvous its ranks meet at."""

    def start(self, rank: Rank, kwargs: dict[str, Any]) -> None:
        """Start ``rank`` running ``rank.fn(**kwargs, stop=...)``, replacing any earlier one."""

    def results(self) -> list[tuple[Key, Any]]:
        """The (key, result) pairs that arrived since the last call."""

    def exit(self, key: Key) -> Exit | None:
        """How the rank ended, or None while it runs (or ended with its result)."""

    def silent_for(self, key: Key) -> float:
        """Seconds since the rank last showed life, or since it was started if it has not yet."""

    def has_started(self, key: Key) -> bool:
        """Whether the rank has shown life since it was started (its imports are done)."""

    def request_stop(self) -> None:
        """Ask every rank to save and return."""

    def kill(self, key: Key) -> None:
        """End the rank at once (it hangs)."""

    def end(self, finished: bool) -> None:
        """End the attempt's ranks: given time to exit if ``finished``, else stopped at once."""


@dataclass
class Supervisor:
    """Runs a job's topology on a backend until its ranks return, replacing or rebuilding."""

    backend: Backend
    topology: Topology
    job: dict[str, Any]  # keyword arguments every rank gets: algo, config, resume, progress
    stop: StopRequest
    replacements: int = 0
    rebuilds: int = 0
    generation: dict[Key, int] = field(default_factory=dict)

    @property
    def config(self) -> TrainConfig:
        return self.job["config"]

    def run(self) -> dict[Any, Any]:
        """Every rank's result by key, with ``group_rebuilds`` and ``worker_replacements``."""
        while True:
            try:
                results = self._attempt()
                return {**results, "group_rebuilds": self.rebuilds, "worker_replacements": self.replacements}
            except WorkerLost as lost:
                if self.stop:  # stopping anyway: ranks ending as they are told to is no reason to rebuild
                    raise
                self.rebuilds += 1
                self._check_limit(f"{lost}; the group was rebuilt {self.rebuilds - 1} times already")
                last = self._latest()
                start = f"checkpoint {last.name}" if last else "the start (no checkpoint yet)"
                n = self.config.num_workers
                log.warning(
                    f"{lost}; rebuilding the group of {n} workers from {start} "
                    f"(rebuild {self.rebuilds} of at most {self.config.max_restarts})"
                )
                self.job = dict(self.job, resume=str(last) if last else self.job["resume"])

    def _attempt(self) -> dict[Any, Any]:
        rendezvous = self.backend.begin(self.topology)
        ranks = {rank.key: rank for rank in self.topology.ranks}
        kwargs = {key: self._kwargs(rank, rendezvous) for key, rank in ranks.items()}
        for key, rank in ranks.items():
            self.backend.start(rank, kwargs[key])
        out: dict[Key, Any] = {}
        stopping = False
        try:
            while len(out) < len(ranks):
                if self.stop and not stopping:
                    stopping = True
                    self.backend.request_stop()
                out.update(self.backend.results())
                self._kill_hung([k for k in ranks if k not in out])
                lost = self._lost(ranks, out)
                if lost:
                    replaceable = all(ranks[k].replaceable for k, e in lost.items() if e.killed)
                    if not stopping and replaceable and all(e.killed for e in lost.values()):
                        for key, how in lost.items():
                            kwargs[key] = self._replace(ranks[key], kwargs[key], how)
                            self.backend.start(ranks[key], kwargs[key])
                        continue
                    key, how = next(((k, e) for k, e in lost.items() if e.killed), next(iter(lost.items())))
                    if how.detail and not how.killed:
                        sys.stderr.write(how.detail)  # the rank's own error: its traceback, once
                    error = WorkerLost if how.killed else TrainingFailed
                    raise error(f"{ranks[key].name} {how.how}")
                time.sleep(0.05)
            return out
        finally:
            self.backend.end(finished=len(out) == len(ranks))

    def _kwargs(self, rank: Rank, rendezvous: str) -> dict[str, Any]:
        kwargs = dict(self.job, rendezvous=rendezvous)
        if rank.role == "worker":
            kwargs.update(rank=rank.key, progress=self.job["progress"] and rank.key == self.topology.chief)
        else:
            kwargs.pop("progress")
        return kwargs

    def _kill_hung(self, running: list[Key]) -> None:
        limit = self.config.hang_timeout
        if limit <= 0:
            return
        for key in running:
            if self.backend.exit(key) is not None:
                continue
            # Before its first sign of life a rank is starting up (importing torch, joining
            # Ray), which takes longer than a short --hang-timeout on a loaded machine.
            started = self.backend.has_started(key)
            allowed = limit if started else max(limit, STARTUP_S)
            if self.backend.silent_for(key) > allowed:
                rank = next(r for r in self.topology.ranks if r.key == key)
                why = (
                    f"showed no sign of life for {limit:g} s (stopped or stuck; --hang-timeout)"
                    if started
                    else f"showed no sign of life in the {allowed:g} s since it was started"
                    " (stuck starting up)"
                )
                log.warning(f"{rank.name} {why}: ending it, as if it had died")
                self.backend.kill(key)

    def _lost(self, ranks: dict[Key, Rank], out: dict[Key, Any]) -> dict[Key, Exit]:
        """The ranks that ended without a result (a rank killed after its result has nothing to lose)."""
        ended = {k: e for k in ranks if k not in out and (e := self.backend.exit(k)) is not None}
        if ended and not all(e.killed for e in ended.values()):
            # A killed rank makes its peers fail too (their gloo links break): give the one
            # killed a moment to show as such, then blame it rather than its peers.
            time.sleep(self.backend.settle_s)
            out.update(self.backend.results())
            ended = {k: e for k in ranks if k not in out and (e := self.backend.exit(k)) is not None}
        return ended

    def _replace(self, rank: Rank, kwargs: dict[str, Any], how: Exit) -> dict[str, Any]:
        """The arguments of the worker that replaces ``rank``; logs why."""
        self.replacements += 1
        self._check_limit(f"{rank.name} {how.how} after {self.replacements - 1} replacements")
        self.generation[rank.key] = self.generation.get(rank.key, 0) + 1
        last = self._latest()
        log.warning(
            f"{rank.name} {how.how}; it is replaced by a new one (from "
            f"{f'checkpoint {last.name}' if last else 'the start'}) while the others train on "
            f"(replacement {self.replacements} of at most {self.config.max_restarts})"
        )
        return dict(
            kwargs, generation=self.generation[rank.key], resume=str(last) if last else kwargs["resume"]
        )

    def _check_limit(self, what: str) -> None:
        if max(self.replacements, self.rebuilds) > self.config.max_restarts:
            raise TrainingFailed(
                f"{what}, the limit (--max-restarts {self.config.max_restarts}); "
                f"checkpoints are in {self.config.run_dir}"
            )

    def _latest(self) -> Path | None:
        from shoal.run.checkpoint import latest

        return latest(Path(self.config.run_dir) / "checkpoints")

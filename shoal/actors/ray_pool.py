"""Decoupled actors as Ray actors, on any node of a Ray cluster (``--backend ray``).

The learner pulls: each actor has at most ``slots_per_actor`` calls of
:meth:`ShoalActor.next` in flight, each returning one trajectory through the object store.
When the learner releases a slot, the pool asks that slot's actor for its next trajectory.
That is the mp pool's backpressure (an actor never runs more than ``slots_per_actor``
trajectories ahead of the learner) without a channel of our own, and a Ray actor runs its
calls in order, so one actor's trajectories arrive in the order it acted them.

A trajectory travels as the bytes of one slot of the :class:`TrajectoryRing` layout (one
buffer, filled by the same ``_fill`` as an mp actor's, into a one-slot ring of the actor's
own) with its header: the policy version that acted, the actor, its sequence number and the
CRC32 the actor computed. The learner copies it into a local ring and verifies the CRC
there, so the loop reads it as it reads an mp slot, and a trajectory damaged anywhere on
the way is refused.

A lost actor (its process or node gone, or silent for ``hang_timeout`` seconds with a call
outstanding) is replaced as on mp: a new Ray actor under the same index, with fresh
episodes and a seed of its own, asked again for what the lost one owed; up to
``max_restarts`` times a run.

Weights: :meth:`RayActors.publish` puts the vector in the object store; every call for a
trajectory carries the newest (version, reference), nested so that Ray does not fetch it
for the call. The actor fetches it only when it refreshes (every ``refresh_every``
trajectories) and the version is newer than the one it acts with.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing as mp
import sys
import time
import zlib
from typing import Any

import numpy as np

from shoal.actors.actor import CRC_MOD, _Carry, _fill, actor_envs, actor_policy, actor_seed
from shoal.actors.pool import ActorFailed, Produced, replace_or_stop, silence
from shoal.actors.shared import TrajectoryLayout, TrajectoryRing

log = logging.getLogger("shoal")

PLACE_S = 120.0  # how long Ray may take to place every actor
CLOSE_S = 10.0  # how long the actors may take to finish the trajectories asked for at close


class ShoalActor:
    """One actor in a Ray worker process: its envs, its policy copy, a one-slot ring."""

    def __init__(
        self,
        algo: str,
        config: Any,
        actor: int,
        boundary: int,
        generation: int,
        layout: TrajectoryLayout,
        faults: dict[str, Any] | None = None,
    ) -> None:
        from shoal.training.callbacks import FaultInjection

        self.config, self.actor = config, actor
        self.faults = FaultInjection(faults, actor) if faults else None  # the test suite's
        self.seed = actor_seed(config, actor, boundary, generation)
        self.policy = actor_policy(algo, config, self.seed)
        self.ring = TrajectoryRing(layout, 1, 1, mp.get_context("spawn"))  # this process's memory only
        self.envs: Any = None
        self.obs: np.ndarray | None = None
        self.carry = _Carry(config)
        self.version = self.seq = self.crc_sum = 0

    def where(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def next(self, weights: list[tuple[int, Any]]) -> dict[str, Any]:
        """Act one trajectory with the newest weights when a refresh is due (``weights``: one
        (version, object reference), in a list so that Ray passes the reference unfetched)."""
        import ray

        if self.faults is not None:  # after the trajectory it sent last, as an mp actor's
            self.faults.after_trajectories(self.seq)
        version, ref = weights[0]
        if self.seq % self.config.refresh_every == 0 and version > self.version:
            self.policy.load(ray.get(ref))
            self.version = version
        if self.envs is None:  # after the first weights, as an mp actor
            self.envs = actor_envs(self.config, self.seed)
            self.obs, _ = self.envs.reset(seed=self.seed)
        self.obs = _fill(
            self.ring.slot(0), self.envs, self.policy, self.obs, self.carry, self.config.nan_policy
        )
        crc = self.ring.seal(0, version=self.version, actor=self.actor, seq=self.seq)
        self.seq += 1
        self.crc_sum = (self.crc_sum + crc) % CRC_MOD
        header = dict(version=self.version, actor=self.actor, seq=self.seq - 1, crc=crc)
        # sent and crc_sum: this actor's counts so far, the pool's record if the actor is lost
        return dict(data=self.ring.raw(0).copy(), header=header, sent=self.seq, crc_sum=self.crc_sum)

    def produced(self) -> tuple[int, int]:
        """(trajectories sent, the sum of their CRC32s): runs after every call asked before it."""
        return self.seq, self.crc_sum


class RayActors:
    """``num_actors`` :class:`ShoalActor` s placed by Ray (spread over the nodes); the same
    calls as :class:`~shoal.actors.pool.MpActors`. Starts a local Ray bound to 127.0.0.1
    unless one runs in this process or ``--ray-address`` names a cluster; shuts it down at
    :meth:`close` if it started it."""

    def __init__(
        self,
        algo: str,
        config: Any,
        layout: TrajectoryLayout,
        *,
        num_actors: int,
        slots_per_actor: int = 2,
        boundary: int = 0,
        max_restarts: int = 0,
        hang_timeout: float = 0.0,
    ) -> None:
        from shoal.launch.ray_backend import ray_start

        self.algo, self.config, self.layout, self.boundary = algo, config, layout, boundary
        self.num_actors, self.slots_per_actor = num_actors, slots_per_actor
        self.ring = TrajectoryRing(layout, num_actors, slots_per_actor, mp.get_context("spawn"))
        self.free = [self.ring.owned(k) for k in range(num_actors)]
        self.queues: list[collections.deque[Any]] = [collections.deque() for _ in range(num_actors)]
        self.received = [0] * num_actors
        self.received_crc = [0] * num_actors
        self.carried = [(0, 0)] * num_actors  # (sent, crc_sum) on each actor's newest trajectory
        self.actors: list[Any] = []
        self.nodes: dict[str, str] | None = None
        self.weights: tuple[int, Any] | None = None
        self.produced: Produced | None = None
        self.max_restarts, self.hang_timeout = max_restarts, hang_timeout
        self.generation = [0] * num_actors
        self.before = [(0, 0)] * num_actors  # (sent, crc_sum) of the actors each one replaced
        self.heard = [0.0] * num_actors  # when its last trajectory arrived (or it was started)
        self.spoke = [False] * num_actors
        self.replaced = 0
        self.lost_in_flight = 0  # a Ray actor's trajectories leave only as results: none is lost
        self.fresh: list[int] = []
        self.started_ray = ray_start(config, workers=num_actors)

    # -- the learner's calls ----------------------------------------------------------------
    def start(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        from shoal.configio import ConfigError

        cpus = self.config.ray_cpus_per_worker
        have = ray.cluster_resources().get("CPU", 0)
        if self.num_actors * cpus > have:
            raise ConfigError(
                f"{self.num_actors} actors x {cpus:g} CPUs need more than the cluster's {have:g} CPUs;"
                " lower --num-actors or --ray-cpus-per-worker"
            )
        self.actors = [self._new_actor(k) for k in range(self.num_actors)]
        places = [a.where.remote() for a in self.actors]
        try:
            ray.wait(places, num_returns=len(places), timeout=PLACE_S)
            self.nodes = {str(k): self._get(k, ref, timeout=0) for k, ref in enumerate(places)}
        except GetTimeoutError:
            raise ConfigError(
                f"Ray could not place {self.num_actors} actors in {PLACE_S:.0f} s;"
                " `ray status` shows free resources"
            ) from None
        for k in range(self.num_actors):
            self.heard[k] = time.monotonic()
            for _ in range(self.slots_per_actor):
                self._ask(k)

    def publish(self, vector: np.ndarray) -> int:
        import ray

        version = 1 + (self.weights[0] if self.weights else 0)
        self.weights = (version, ray.put(np.asarray(vector, np.float32)))
        return version

    def receive(self, timeout: float) -> list[int]:
        """Arrived trajectories in local slots (CRC verified), waiting up to ``timeout`` s for
        the first. Only the oldest call of each actor is waited on: its trajectories stay in order."""
        import ray

        out: list[int] = []
        wait = timeout
        while True:
            heads = {q[0]: k for k, q in enumerate(self.queues) if q}
            if not heads:
                if wait:
                    time.sleep(wait)
                return out
            ready, _ = ray.wait(list(heads), num_returns=1 if wait else len(heads), timeout=wait)
            if not ready:
                self._end_hung()  # after taking every result that is there
                return out
            for ref in ready:
                k = heads[ref]
                self.queues[k].popleft()
                try:
                    got = self._get(k, ref)
                except _Lost as lost:
                    self._replace(k, str(lost), owed=1)
                    continue
                out.append(self._slot(k, got))
            wait = 0

    def take_replaced(self) -> list[int]:
        """The actors replaced since the last call (their new episodes start from scratch)."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def backlog(self) -> int:
        """Trajectories done and not received yet."""
        import ray

        refs = [ref for q in self.queues for ref in q]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0]) if refs else 0

    def sent(self) -> int:
        return sum(self.received) + self.backlog()

    def release(self, slot: int) -> None:
        actor = self.ring.owner(slot)
        self.free[actor].append(slot)
        if self.produced is None:
            self._ask(actor)

    def close(self) -> Produced:
        """Let the actors finish what was asked of them (up to ``CLOSE_S``), receive it (counted,
        not learned from), read their counts, kill them, and shut Ray down if this pool started it.

        The counts of an actor that is lost are those carried on its last trajectory received."""
        if self.produced is not None:
            return self.produced
        import ray

        try:
            deadline = time.monotonic() + CLOSE_S
            counts = {k: a.produced.remote() for k, a in enumerate(self.actors)}  # after every next
            for k, ref in counts.items():
                for pending in list(self.queues[k]):
                    with contextlib.suppress(Exception):
                        got = ray.get(pending, timeout=max(0.0, deadline - time.monotonic()))
                        self.carried[k] = (got["sent"], got["crc_sum"])
                        self._count(k, got["header"]["crc"], got["data"])
                self.queues[k].clear()
                with contextlib.suppress(Exception):
                    self.carried[k] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            sent = [b[0] + c[0] for b, c in zip(self.before, self.carried)]
            crc = [(b[1] + c[1]) % CRC_MOD for b, c in zip(self.before, self.carried)]
            self.produced = Produced(sent, crc, list(self.received), list(self.received_crc))
        finally:
            if self.produced is None:  # Ray itself failed: nothing can be counted
                self.produced = Produced(
                    [-1] * self.num_actors, [0] * self.num_actors, self.received, self.received_crc
                )
            for actor in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
            self.weights = None
            if self.started_ray:
                ray.shutdown()
        return self.produced

    @property
    def num_slots(self) -> int:
        return self.ring.num_slots

    # -- inside -----------------------------------------------------------------------------
    def _new_actor(self, k: int) -> Any:
        import ray

        from shoal.training.callbacks import FaultInjection

        remote = ray.remote(ShoalActor).options(
            num_cpus=self.config.ray_cpus_per_worker, scheduling_strategy="SPREAD", max_restarts=0
        )
        # the test suite's faults, read here where the test set them (a Ray worker's environment
        # is its raylet's, not the learner's); each fires once a run (claimed in their dir)
        faults = FaultInjection.spec_from_environment()
        seat = (k, self.boundary, self.generation[k])
        return remote.remote(self.algo, self.config, *seat, self.layout, faults)

    def _end_hung(self) -> None:
        """Replace every actor that owes a trajectory and sent none for ``hang_timeout`` s (the
        learner asks again as soon as it frees a slot: silence means stopped or stuck)."""
        now = time.monotonic()
        for k, queue in enumerate(self.queues):
            why = silence(self.heard[k], self.spoke[k], self.hang_timeout, now) if queue else None
            if why:
                self._replace(k, f"actor {k} {why}")

    def _replace(self, k: int, why: str, owed: int = 0) -> None:
        """A new actor ``k`` for the lost one, asked for what the lost one owed (or stop)."""
        import ray

        replace_or_stop(k, why, self.replaced, self.max_restarts)
        with contextlib.suppress(Exception):
            ray.kill(self.actors[k])
        owed += len(self.queues[k])  # its other calls fail with it
        self.queues[k].clear()
        b, c = self.before[k], self.carried[k]
        self.before[k], self.carried[k] = (b[0] + c[0], (b[1] + c[1]) % CRC_MOD), (0, 0)
        self.generation[k] += 1
        self.actors[k] = self._new_actor(k)
        if self.nodes is not None:
            with contextlib.suppress(Exception):
                self.nodes[str(k)] = ray.get(self.actors[k].where.remote(), timeout=PLACE_S)
        self.heard[k], self.spoke[k] = time.monotonic(), False
        self.replaced += 1
        self.fresh.append(k)
        for _ in range(owed):
            self._ask(k)

    def _ask(self, actor: int) -> None:
        """One more trajectory from ``actor``, with the newest weights."""
        assert self.weights is not None, "publish before start"
        self.queues[actor].append(self.actors[actor].next.remote([self.weights]))

    def _get(self, actor: int, ref: Any, timeout: float | None = None) -> Any:
        """The call's result; an actor that raised or is lost: :class:`ActorFailed`, one line
        (Ray's account of it, with any traceback, written to stderr above it)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref, timeout=timeout)
        except RayActorError as error:
            if not error.actor_init_failed:
                raise _Lost(f"actor {actor} died (its Ray actor was lost)") from None
            sys.stderr.write(f"{error}\n")
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise ActorFailed(
                f"actor {actor} failed to start: {lines[-1] if lines else 'no reason given'}"
            ) from None
        except RayTaskError as error:
            cause = error.cause if error.cause is not None else error
            sys.stderr.write(f"{error}\n")
            text = " ".join(f"{type(cause).__name__}: {cause}".split())
            raise ActorFailed(f"actor {actor} raised {text}") from None

    def _slot(self, actor: int, got: dict[str, Any]) -> int:
        h = got["header"]
        if h["actor"] != actor:
            raise ActorFailed(f"actor {actor} sent a trajectory of actor {h['actor']}")
        slot = self.free[actor].pop(0)  # one is free: a call in flight holds one of its slots
        self.ring.store(slot, got["data"], **h)
        self.carried[actor] = (got["sent"], got["crc_sum"])
        self.heard[actor], self.spoke[actor] = time.monotonic(), True
        self._count(actor, self.ring.verify(slot))
        return slot

    def _count(self, actor: int, crc: int, data: np.ndarray | None = None) -> None:
        if data is not None and zlib.crc32(data) != crc:
            return  # damaged on the way: not received (the counts will not match)
        self.received[actor] += 1
        self.received_crc[actor] = (self.received_crc[actor] + crc) % CRC_MOD


class _Lost(ActorFailed):
    """A Ray actor gone (its process or node): the pool replaces it when it may."""

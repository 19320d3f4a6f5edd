"""Where actors run. The learner loop talks to an actor pool through four calls:

    publish(vector)  -> the version actors will act with next
    receive(timeout) -> indices of filled trajectory slots (read them with ``ring.slot``)
    backlog()        -> how many are sent and not received yet
    sent()           -> how many the actors sent so far (their throughput)
    release(slot)    -> the slot goes back to the actor that owns it
    close()          -> every actor stopped and joined; what it produced, counted

:class:`MpActors` runs them as processes on this machine, with the trajectory ring and the
weight buffer in shared memory (:mod:`shoal.actors.shared`).
:class:`~shoal.actors.ray_pool.RayActors` runs them as Ray actors on any node of a cluster:
its ``receive`` copies trajectories fetched from the object store into a local ring.

Replacing a lost actor is the pool's business. An mp actor killed (by a signal, the OOM
killer) or silent for ``hang_timeout`` seconds (stopped, stuck) is ended and replaced by a
new one under the same index, with fresh episodes and a seed of its own, while the learner
trains on; up to ``max_restarts`` times a run, then the run stops. An actor that raised (an
error of its env or of ours) is not replaced: a new one would raise the same.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import numpy as np

from shoal.actors.actor import CRC_MOD, STOP, ActorJob, actor_main, produced_at
from shoal.actors.shared import (
    ERROR_TAG,
    TrajectoryLayout,
    TrajectoryRing,
    WeightBuffer,
    pack_index,
    unpack_index,
)
from shoal.launch.supervisor import STARTUP_S, TrainingFailed

log = logging.getLogger("shoal")


class ActorFailed(TrainingFailed):
    """An actor raised or died; the message is one line (its traceback was printed above)."""


@dataclass
class Produced:
    """What the actors sent, and what became of it (``consistent``: nothing lost, nothing twice)."""

    sent: list[int]  # trajectories each actor sent
    sent_crc: list[int]  # the sum of their CRC32s, per actor (mod 2**62)
    received: list[int]  # trajectories the learner received from each actor
    received_crc: list[int]

    @property
    def consistent(self) -> bool:
        return self.sent == self.received and self.sent_crc == self.received_crc


def silence(heard: float, spoke: bool, hang_timeout: float, now: float) -> str | None:
    """Why an actor last heard from at ``heard`` counts as hung at ``now``, or None.

    An actor that has not spoken yet gets the start-up allowance (imports, first weights)."""
    allowed = hang_timeout if spoke else max(hang_timeout, STARTUP_S)
    if hang_timeout <= 0 or now - heard <= allowed:
        return None
    since = "" if spoke else " since it was started"
    return f"sent nothing{since} for {allowed:g} s (stopped or stuck; --hang-timeout)"


def replace_or_stop(actor: int, why: str, replaced: int, max_restarts: int) -> None:
    """Allow replacing lost actor ``actor`` (the ``replaced + 1``-th), warning that the learner
    trains on; or raise :class:`ActorFailed` once ``max_restarts`` were used."""
    if replaced >= max_restarts:
        if max_restarts == 0:
            raise ActorFailed(why)
        raise ActorFailed(f"{why}, after {replaced} replacements, the limit (--max-restarts)")
    log.warning(
        f"{why}; a new actor {actor} takes its place while the learner trains on"
        f" (replacement {replaced + 1} of at most {max_restarts})"
    )


class ActorPool(Protocol):
    """What the learner loop calls; see the module docstring."""

    ring: TrajectoryRing
    nodes: dict[str, str] | None  # actor -> the Ray node it runs on (None: this machine)
    replaced: int  # lost actors replaced so far
    lost_in_flight: int  # trajectories lost actors counted as sent that never arrived

    def start(self) -> None: ...
    def publish(self, vector: np.ndarray) -> int: ...
    def receive(self, timeout: float) -> list[int]: ...
    def backlog(self) -> int: ...
    def sent(self) -> int: ...
    def take_replaced(self) -> list[int]: ...
    def release(self, slot: int) -> None: ...
    def close(self) -> Produced: ...

    @property
    def num_slots(self) -> int: ...


# Actors are forked where fork is safe (Linux), as ProcessVectorEnv's env workers are: a
# forked actor starts at once with the learner's modules already imported, where a spawned
# one first imports torch (~2 s here, for each actor at the same time): APPO's first 5.6k
# CartPole steps took 2.9-3.2 s spawned, 1.1 s forked, of a time to 475 of 3-7 s. An
# actor touches nothing of the learner's but the shared ring and weights: it runs its own CPU
# policy copy, with one torch thread, so the learner's CUDA context or thread pools (which
# fork does not carry over) are never used in it. macOS and Windows spawn.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


class MpActors:
    """``num_actors`` actor processes on this machine, sharing memory with the learner.

    ``boundary``: the checkpoint boundary the run (re)starts from, which seeds the actors' envs.
    ``max_restarts``/``hang_timeout``: see the module docstring (0: never replace / never time out).
    ``target`` is what each actor process runs (``actor_main``; tests pass their own).
    """

    def __init__(
        self,
        algo: str,
        config: Any,
        layout: TrajectoryLayout,
        weight_size: int,
        *,
        num_actors: int,
        slots_per_actor: int = 2,
        boundary: int = 0,
        max_restarts: int = 0,
        hang_timeout: float = 0.0,
        target: Any = actor_main,
    ) -> None:
        self.ctx = mp.get_context(START_METHOD)
        self.algo, self.config, self.target, self.boundary = algo, config, target, boundary
        self.num_actors = num_actors
        self.ring = TrajectoryRing(layout, num_actors, slots_per_actor, self.ctx)
        self.weights = WeightBuffer(weight_size, self.ctx)
        self._control = self.ctx.RawArray("q", 1 + 2 * num_actors)
        self.control = np.frombuffer(self._control, dtype=np.int64)
        self.procs: list[Any] = [None] * num_actors
        self.conns: list[Connection] = [None] * num_actors  # type: ignore[list-item]
        self.received = [0] * num_actors
        self.received_crc = [0] * num_actors
        self.closed = False
        self.max_restarts, self.hang_timeout = max_restarts, hang_timeout
        self.generation = [0] * num_actors  # replacements of each actor so far
        self.heard = [0.0] * num_actors  # when its last trajectory (or its start) was seen
        self.spoke = [False] * num_actors  # whether it has sent anything yet
        self.replaced = 0
        self.lost_in_flight = 0  # trajectories a lost actor counted as sent but never announced
        self.retired: list[int] = []  # lost actors whose replacement starts at the next receive
        self.fresh: list[int] = []  # actors replaced since the learner last asked (take_replaced)
        self.nodes: dict[str, str] | None = None

    # -- the learner's calls ----------------------------------------------------------------
    def start(self) -> None:
        for k in range(self.num_actors):
            self._spawn(k)

    def publish(self, vector: np.ndarray) -> int:
        return self.weights.publish(vector)

    def receive(self, timeout: float) -> list[int]:
        """Filled slots (verified against their CRC), waiting up to ``timeout`` s for the first.

        Actors lost since the last call are replaced first: by now the learner has released
        every slot they sent, so their replacements start with all of their slots free.
        """
        for actor in self.retired:
            self._spawn(actor)
        self.retired = []
        out: list[int] = []
        live = [conn for conn in self.conns if not conn.closed]
        for conn in wait(live, timeout):
            actor = self.conns.index(conn)  # type: ignore[arg-type]
            try:
                while conn.poll():
                    out.append(self._slot(actor, conn.recv_bytes()))
            except (EOFError, OSError):  # what it sent before it died is in ``out``
                self._retire(actor, self._how_it_ended(actor))
        self._end_hung()
        return out

    def take_replaced(self) -> list[int]:
        """The actors replaced since the last call (their new episodes start from scratch)."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def backlog(self) -> int:
        """Trajectories sent and not received yet: the queue's fill."""
        return int(sum(self.control[produced_at(k)[0]] for k in range(self.num_actors))) - sum(self.received)

    def sent(self) -> int:
        """Trajectories the actors sent so far, as they count them (``actor_sps``)."""
        return int(sum(self.control[produced_at(k)[0]] for k in range(self.num_actors)))

    def release(self, slot: int) -> None:
        with contextlib.suppress(OSError):  # an actor that has stopped needs it no more
            self.conns[self.ring.owner(slot)].send_bytes(pack_index(slot))

    def close(self) -> Produced:
        """Stop every actor, join it (killed after 10 s), and count what it produced.

        Slots sent but not received by then are received here (counted, not learned from).
        """
        if not self.closed:
            self.closed = True
            self.control[STOP] = 1
            for proc in self.procs:
                if proc is None:
                    continue
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            for actor, conn in enumerate(self.conns):
                if conn is None:  # never started: starting it (or an earlier one) failed
                    continue
                with contextlib.suppress(EOFError, OSError, ActorFailed):
                    while conn.poll():
                        self._slot(actor, conn.recv_bytes())
                conn.close()
        sent = [int(self.control[produced_at(k)[0]]) for k in range(self.num_actors)]
        crc = [int(self.control[produced_at(k)[1]]) for k in range(self.num_actors)]
        return Produced(sent, crc, list(self.received), list(self.received_crc))

    @property
    def num_slots(self) -> int:
        return self.ring.num_slots

    # -- inside -----------------------------------------------------------------------------
    def _spawn(self, k: int) -> None:
        mine, theirs = self.ctx.Pipe(duplex=True)
        job = ActorJob(
            k,
            self.algo,
            self.config,
            self.ring,
            self.weights,
            self._control,
            os.getpid(),
            self.boundary,
            self.generation[k],
        )
        proc = self.ctx.Process(target=self.target, args=(job, theirs), name=f"shoal-actor-{k}", daemon=True)
        proc.start()
        theirs.close()  # the actor holds the only other end: its death is EOF here
        self.procs[k], self.conns[k] = proc, mine
        self.heard[k], self.spoke[k] = time.monotonic(), False

    def _end_hung(self) -> None:
        """End and replace every actor that sent nothing for ``hang_timeout`` s.

        An actor always has a free slot here (the learner frees each one as it reads it), so
        silence means it is stopped or stuck, not waiting for the learner.
        """
        now = time.monotonic()
        for k, conn in enumerate(self.conns):
            why = None if conn.closed else silence(self.heard[k], self.spoke[k], self.hang_timeout, now)
            if why:
                self._retire(k, f"actor {k} {why}")

    def _retire(self, actor: int, why: str) -> None:
        """Actor ``actor`` is lost: end it, settle its counts, and have it replaced (or stop)."""
        replace_or_stop(actor, why, self.replaced, self.max_restarts)
        proc, conn = self.procs[actor], self.conns[actor]
        if proc.is_alive():
            proc.kill()
        proc.join()
        conn.close()  # the learner's releases of its last slots go nowhere: they are free anyway
        # A trajectory counted as sent whose index never left was lost with the actor: counted
        # apart, so that what was announced still proves exactly-once delivery.
        sent, crc = produced_at(actor)
        self.lost_in_flight += int(self.control[sent]) - self.received[actor]
        self.control[sent], self.control[crc] = self.received[actor], self.received_crc[actor]
        self.generation[actor] += 1
        self.replaced += 1
        self.retired.append(actor)
        self.fresh.append(actor)

    def _slot(self, actor: int, message: bytes) -> int:
        if message.startswith(ERROR_TAG) and len(message) != 4:
            text = message[1:].decode(errors="replace")
            first, _, rest = text.partition("\n")
            sys.stderr.write(rest)
            raise ActorFailed(f"actor {actor} raised {first}")
        slot = unpack_index(message)
        if self.ring.owner(slot) != actor:
            raise ActorFailed(f"actor {actor} sent slot {slot}, which actor {self.ring.owner(slot)} owns")
        crc = self.ring.verify(slot)
        self.heard[actor], self.spoke[actor] = time.monotonic(), True
        self.received[actor] += 1
        self.received_crc[actor] = (self.received_crc[actor] + crc) % CRC_MOD
        return slot

    def _how_it_ended(self, actor: int) -> str:
        proc = self.procs[actor]
        proc.join(2)
        code = proc.exitcode
        if code is not None and code < 0:
            return f"actor {actor} was killed by {signal.Signals(-code).name}"
        return f"actor {actor} exited with code {code}"

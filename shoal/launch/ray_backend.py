"""The ``ray`` backend: every rank a Ray actor, placed by Ray on any machine of the cluster.

Ray is the cluster: shoal asks it for actors and never speaks a protocol of its own. A
local Ray that shoal starts binds 127.0.0.1 only; ``--ray-address`` joins a real cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from shoal.config import TrainConfig
from shoal.launch.ranks import free_port
from shoal.launch.supervisor import Exit, Key, Rank, Topology
from shoal.training.trainer import StopRequest

PING_S = 1.0  # how often the supervisor asks each actor whether it is alive


class _RayRank:
    """The Ray actor that hosts one rank."""

    def __init__(self) -> None:
        self.stop_request = StopRequest()

    def rendezvous(self) -> str:
        """This node's address and a port free on it: the group's meeting point."""
        import ray

        addr = ray.util.get_node_ip_address()
        return f"tcp://{addr}:{free_port(addr)}"

    def where(self) -> tuple[str, str]:
        """(Ray node id, node address) of this actor."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def stop(self) -> None:
        """Ask the rank's training loop to save and return (runs beside ``run``)."""
        self.stop_request.request("stop")

    def ping(self) -> bool:
        """Answers while the actor's process runs (a stopped or frozen one does not)."""
        return True

    def run(self, fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        import faulthandler

        faulthandler.enable()  # a crash in native code (gloo, torch) still shows every thread's stack
        return fn(**kwargs, stop=self.stop_request)


class RayWorker(_RayRank):
    """A training worker (its own class so that `ray status` and process titles tell it apart)."""


class RayServer(_RayRank):
    """The parameter server."""


def ray_start(config: TrainConfig, workers: int | None = None) -> bool:
    """Connect to the given cluster, or start a local Ray bound to 127.0.0.1; True if started.

    ``workers``: how many actors of ``ray_cpus_per_worker`` CPUs a local Ray must fit
    (default ``num_workers``; decoupled runs pass ``num_actors``)."""
    if not config.ray_address:  # Ray reads it once, on import: a local Ray binds 127.0.0.1 only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if config.ray_address:
        ray.init(address=config.ray_address, logging_level=logging.WARNING)
        return False
    needed = (config.num_workers if workers is None else workers) * config.ray_cpus_per_worker
    ours = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Ray's own processes (gcs_server, raylet, ...) stay in our process group and block only
    # SIGINT: a SIGTERM to the group (Slurm, systemd, `timeout`) ended the raylet, and with it
    # the ranks, while they were saving (seen in CI under load). Started with SIGTERM blocked
    # (the mask survives exec), they leave when we end them, after the ranks have returned.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        _start_local_ray(ray, needed)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    # Ray's core installs a SIGTERM handler that aborts the driver: a scheduler's stop must
    # reach ours, which has every rank save and return.
    if threading.current_thread() is threading.main_thread():
        for s, handler in ours.items():
            if callable(handler):
                signal.signal(s, handler)
    return True


def _start_local_ray(ray: Any, needed: float) -> None:
    ray.init(
        # "local": a Ray of our own. Without an address, ray.init() joins the newest Ray
        # started on this machine (another job's: seen in CI, a second run failed to start).
        address="local",
        num_cpus=max(os.cpu_count() or 1, int(-(-needed // 1))),  # never wait for CPUs we lack
        include_dashboard=False,
        logging_level=logging.WARNING,
    )


class RayBackend:
    """Ranks as Ray actors; a lost actor (its process or node gone) is a killed rank."""

    settle_s = 2.0

    def __init__(self, config: TrainConfig, scratch: str) -> None:
        self.config, self.scratch = config, scratch
        self.actors: dict[Key, Any] = {}
        self.refs: dict[Key, Any] = {}
        self.exits: dict[Key, Exit] = {}
        self.pings: dict[Key, tuple[Any, float]] = {}  # the ping in flight and when it was sent
        self.alive_at: dict[Key, float] = {}
        self.answered: set[Key] = set()  # ranks that answered a ping since their start
        self.nodes: dict[str, str] = {}
        self.attempt = 0

    def begin(self, topology: Topology) -> str:
        import ray
        from ray.exceptions import GetTimeoutError

        from shoal.configio import ConfigError

        self.attempt += 1
        self._kill_all()
        n, c = self.config.num_workers, self.config
        for kind, each in (("CPU", c.ray_cpus_per_worker), ("GPU", c.ray_gpus_per_worker)):
            have = ray.cluster_resources().get(kind, 0)
            if n * each > have:
                raise ConfigError(
                    f"{n} workers x {each:g} {kind}s need more than the cluster's {have:g} {kind}s;"
                    f" lower --num-workers or --ray-{kind.lower()}s-per-worker"
                )
        for rank in topology.ranks:
            self.actors[rank.key] = self._actor(rank)
        try:  # placement: resources can exist in total yet fit on no node
            places = ray.get([a.where.remote() for a in self.actors.values()], timeout=120)
        except GetTimeoutError:
            raise ConfigError(
                f"Ray could not place {len(self.actors)} actors in 120 s; `ray status` shows free resources"
            ) from None
        self.nodes = {str(key): node for key, (node, _) in zip(self.actors, places)}
        # Every rank on this machine: a file rendezvous, so nothing listens beyond loopback
        # (torch's TCP store listens on every interface). Across machines: TCP on the node of
        # rank 0, or of the server, which hosts the store its links meet through.
        if all(ip == ray.util.get_node_ip_address() for _, ip in places):
            return f"file://{self.scratch}/rendezvous-{self.attempt}"
        host = self.actors.get("server", self.actors[topology.chief])
        return ray.get(host.rendezvous.remote())

    def _actor(self, rank: Rank) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # The chief and the server run beside the driver, so the run directory lands here.
        beside = rank.key == 0 or rank.role == "server"
        here = ray.get_runtime_context().get_node_id()
        worker = rank.role == "worker"
        return (
            ray.remote(RayWorker if worker else RayServer)
            .options(
                max_concurrency=3,  # `stop` and `ping` run while `run` does
                num_cpus=self.config.ray_cpus_per_worker if worker else 0,
                num_gpus=self.config.ray_gpus_per_worker if worker else 0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True) if beside else "SPREAD",
            )
            .remote()
        )

    def start(self, rank: Rank, kwargs: dict[str, Any]) -> None:
        import ray

        if rank.key in self.refs:  # a replacement: a new actor
            ray.kill(self.actors[rank.key])
            self.actors[rank.key] = self._actor(rank)
        self.refs[rank.key] = self.actors[rank.key].run.remote(rank.fn, kwargs)
        self.exits.pop(rank.key, None)
        self.pings.pop(rank.key, None)
        self.alive_at[rank.key] = time.monotonic()
        self.answered.discard(rank.key)

    def results(self) -> list[tuple[Key, Any]]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = {ref: key for key, ref in self.refs.items() if key not in self.exits}
        if not pending:
            return []
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        out = []
        for ref in done:
            key = pending[ref]
            try:
                out.append((key, ray.get(ref)))
                self.exits[key] = Exit("returned", killed=False)  # not running: no more pings
                del self.refs[key]
            except RayActorError:
                self.exits[key] = Exit("died (its Ray actor was lost) before returning a result", killed=True)
            except RayTaskError as error:
                cause = error.cause if error.cause is not None else error
                text = " ".join(f"{type(cause).__name__}: {cause}".split())
                self.exits[key] = Exit(f"failed: {text}", killed=False)
        return out

    def exit(self, key: Key) -> Exit | None:
        found = self.exits.get(key)
        return None if found is None or found.how == "returned" else found

    def silent_for(self, key: Key) -> float:
        import ray

        now = time.monotonic()
        sent = self.pings.get(key)
        if sent is not None and ray.wait([sent[0]], timeout=0)[0]:
            self.alive_at[key] = sent[1]
            self.answered.add(key)
            sent = None
        if sent is None and now - self.alive_at[key] >= PING_S:
            self.pings[key] = (self.actors[key].ping.remote(), now)
        return now - self.alive_at[key]

    def has_started(self, key: Key) -> bool:
        return key in self.answered

    def request_stop(self) -> None:
        for key, actor in self.actors.items():
            if key in self.refs:
                actor.stop.remote()

    def kill(self, key: Key) -> None:
        import ray

        ray.kill(self.actors[key])
        self.exits[key] = Exit(
            "hung (no answer to pings) and was ended before returning a result", killed=True
        )

    def end(self, finished: bool) -> None:
        self._kill_all()

    def _kill_all(self) -> None:
        import ray

        for actor in self.actors.values():
            ray.kill(actor)
        self.actors, self.refs, self.exits, self.pings = {}, {}, {}, {}

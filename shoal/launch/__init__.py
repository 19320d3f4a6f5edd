"""Backends: where training workers run.

- ``local``: one learner in this process.
- ``mp``: ``num_workers`` processes on this machine.
- ``ray``: ``num_workers`` Ray actors, placed by Ray on any machine of the cluster.

On ``mp`` and ``ray`` the workers of ``sync`` and ``param-avg`` join one torch.distributed
group; with a parameter server (``a3c``, ``param-server``) each worker opens its own link to
it (``shoal.distributed.link``). Every backend runs the same code: :func:`run_worker` and
:func:`run_server`; a lost worker is replaced (links) or the group rebuilt (see
:class:`Replacements`, :func:`_with_rebuilds`). The backend only decides where those functions
run; the strategy decides how the workers cooperate; the algorithm knows neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from shoal.config import TrainConfig
from shoal.distributed.names import SERVER_STRATEGIES, STRATEGIES
from shoal.distributed.strategy import ParamAvgStrategy, ServerStrategy, Strategy, SyncStrategy
from shoal.training.trainer import STOP

log = logging.getLogger("shoal")


class TrainingFailed(RuntimeError):
    """A rank failed for good: its own traceback is above, this says which and what is kept."""


class RankError(str):
    """A rank's exception in one line, sent to the launcher before the rank exits."""


class WorkerLost(TrainingFailed):
    """A worker or the server died (killed, out of memory, its machine gone): rebuild the group."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def group_size(config: TrainConfig) -> int:
    """Ranks in the torch.distributed group: the workers, and the parameter server if any."""
    return config.num_workers + (config.strategy in SERVER_STRATEGIES)


def make_strategy(config: TrainConfig, rank: int, link: Any = None) -> Strategy:
    n, compress, ratio = config.num_workers, config.compress, config.topk_ratio
    if config.strategy == "sync":
        return SyncStrategy(rank, n, compress, ratio)
    if config.strategy == "param-avg":
        return ParamAvgStrategy(rank, n, config.sync_every, compress, ratio)
    if config.strategy in SERVER_STRATEGIES:  # A3C does not even wait for the server's answer
        from shoal.distributed.wire import peer_timeout_of

        pipelined, timeout = config.strategy == "a3c", peer_timeout_of(config)
        return ServerStrategy(rank, n, compress, ratio, pipelined, link, peer_timeout=timeout)
    raise ValueError(f"unknown strategy {config.strategy!r}; available: {', '.join(STRATEGIES)}")


def train(algo: str, config: TrainConfig, *, resume: Any = None, progress: bool = True) -> tuple[dict, str]:
    """Train with the config's backend; return (the chief's summary, the run directory)."""
    from shoal.algos import ALGORITHMS
    from shoal.training.trainer import Trainer, default_run_dir

    if config.backend == "local":
        trainer = Trainer(ALGORITHMS[algo], config, progress=progress)
        return trainer.train(resume=resume), str(trainer.run_dir)
    if resume is not None:  # a damaged checkpoint is refused here, before any rank starts
        from shoal.run.checkpoint import load

        load(resume)
    # Every worker (and, on a cluster, every machine) must agree on one absolute run directory.
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(algo, config)
    config = dataclasses.replace(config, run_dir=str(run_dir.resolve()))
    job = dict(algo=algo, config=config, resume=str(resume) if resume else None)
    results = _train_mp(job, progress) if config.backend == "mp" else _train_ray(job, progress)
    summary = results[0]
    # What only the launcher knows joins the chief's summary: the server's counts, placement.
    extra = {
        "parameter_server": results.get("server"),
        "nodes": results.get("nodes"),
        "group_rebuilds": results.get("group_rebuilds"),
        "worker_replacements": results.get("worker_replacements"),
    }
    summary.update({k: v for k, v in extra.items() if v is not None})
    written = Path(config.run_dir) / "summary.json"
    if written.exists():  # on a cluster without a shared disk, the chief may have written elsewhere
        import json

        written.write_text(json.dumps(summary, indent=1))
    return summary, config.run_dir


def _with_rebuilds(attempt: Any, job: dict[str, Any]) -> dict[Any, dict]:
    """Run ``attempt(job)``; when a worker is lost, rebuild the whole group from the last checkpoint.

    torch.distributed groups have a fixed membership, so a lost rank cannot be replaced in
    place: every rank stops and a new group starts from the chief's latest checkpoint (the
    steps since then are trained again). Errors raised by the training code itself are not
    retried: they would happen again.
    """
    from shoal.run.checkpoint import latest

    config: TrainConfig = job["config"]
    rebuilds = 0
    while True:
        try:
            results = attempt(job)
            results["group_rebuilds"] = rebuilds
            return results
        except WorkerLost as lost:
            if STOP:  # stopping anyway: ranks ending as they are told to is no reason to rebuild
                raise
            rebuilds += 1
            if rebuilds > config.max_restarts:
                raise TrainingFailed(
                    f"{lost}; the group was rebuilt {rebuilds - 1} times already, the limit "
                    f"(--max-restarts {config.max_restarts}); checkpoints are in {config.run_dir}"
                ) from None
            last = latest(Path(config.run_dir) / "checkpoints")
            start = f"checkpoint {last.name}" if last else "the start (no checkpoint yet)"
            log.warning(
                f"{lost}; rebuilding the group of {config.num_workers} workers from {start} "
                f"(rebuild {rebuilds} of at most {config.max_restarts})"
            )
            job = dict(job, resume=str(last) if last else job["resume"])


# -- what runs in every worker, whatever the backend -----------------------------------------
def _join_group(rank: int, size: int, rendezvous: str) -> None:
    """Join the group. A ``file://`` rendezvous means every rank is on this machine: nothing
    then listens beyond 127.0.0.1 (a TCP rendezvous store listens on every interface)."""
    import torch.distributed as dist

    from shoal.distributed.link import local_gloo

    local_gloo(rendezvous)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=size)


def run_worker(
    rank: int,
    algo: str,
    config: TrainConfig,
    resume: str | None,
    progress: bool,
    rendezvous: str,
    generation: int = 0,
) -> dict[str, Any]:
    """Training worker ``rank``: its own envs and model copy, cooperating through the strategy.

    With a parameter server the worker opens its own link to it (``generation`` > 0: it
    replaces a lost worker); otherwise it joins the group of all workers.
    """
    import torch.distributed as dist

    from shoal.algos import ALGORITHMS
    from shoal.distributed.link import WORKER, Link, announce, open_store
    from shoal.training.trainer import Trainer

    if config.strategy in SERVER_STRATEGIES:
        store = open_store(rendezvous, host=False)
        announce(store, rank, generation)
        link = Link(store, rank, generation, WORKER)
        strategy = make_strategy(config, rank, link)
        return Trainer(ALGORITHMS[algo], config, strategy=strategy, progress=progress).train(resume=resume)
    _join_group(rank, group_size(config), rendezvous)
    try:
        trainer = Trainer(ALGORITHMS[algo], config, strategy=make_strategy(config, rank), progress=progress)
        return trainer.train(resume=resume)
    finally:
        dist.destroy_process_group()


def run_server(algo: str, config: TrainConfig, resume: str | None, rendezvous: str) -> dict[str, Any]:
    """The parameter server, holding the global model and optimizer; it hosts the links' store.

    It builds the algorithm exactly as the workers do (same seed, so the same initial
    weights) and, when resuming, loads the same checkpoint; each worker is then greeted with
    the global weights when its link opens.
    """
    import torch

    from shoal.algos import ALGORITHMS
    from shoal.distributed.link import open_store
    from shoal.distributed.server import ParameterServer
    from shoal.distributed.wire import peer_timeout_of
    from shoal.run import checkpoint as ckpt
    from shoal.training.trainer import spaces_of

    store = open_store(rendezvous, host=True)
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    obs_space, action_space = spaces_of(config.env)
    algorithm = ALGORITHMS[algo](config, obs_space, action_space, torch.device("cpu"))
    if resume:
        arrays, _ = ckpt.load(resume)
        for name, module in algorithm.modules().items():
            ckpt.load_module(f"model/{name}", module, arrays)
    # Every optimizer of the algorithm, in its order: a push names one by its index.
    # A3C bounds staleness; the general parameter server applies every gradient (Downpour).
    a3c = config.strategy == "a3c"
    server = ParameterServer(
        algorithm.optimizers().values(),
        config.num_workers,
        "async" if a3c else config.ps_mode,
        config.max_policy_lag if a3c else None,
        config.compress,
        config.topk_ratio,
        peer_timeout=peer_timeout_of(config),
    )
    return server.serve(store)


# -- mp: processes on this machine -----------------------------------------------------------
def _exit_with_parent(parent_pid: int) -> None:
    """A training worker whose launcher died (even by SIGKILL) ends itself."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _stop_when_set(event: Any) -> None:
    """Turn the launcher's stop event into this process's stop request (see Trainer.stop)."""
    from shoal.training.trainer import STOP

    event.wait()
    STOP.request("stop")


def _mp_entry(key: Any, fn: Any, kwargs: dict, results: Any, parent_pid: int, stop: Any) -> None:
    import faulthandler

    faulthandler.enable()  # a crash in native code (gloo, torch) still shows every thread's stack
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C and stops us
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    threading.Thread(target=_stop_when_set, args=(stop,), daemon=True).start()
    code = 1
    try:
        results.put((key, fn(**kwargs)))
        code = 0
    except BaseException as error:
        traceback.print_exc()
        with contextlib.suppress(Exception):  # the launcher's one-line error says why, not just "code 1"
            results.put((key, RankError(" ".join(f"{type(error).__name__}: {error}".split()))))
    finally:
        # Leave without interpreter teardown: torch's gloo threads can abort the process
        # there ("terminate called without an active exception") after the work is done.
        # Files are closed and checkpoints fsynced by now; only the streams need a flush.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _train_mp(job: dict[str, Any], progress: bool) -> dict[Any, dict]:
    return _with_rebuilds(lambda job: _mp_attempt(job, progress), job)


def _how(proc: Any) -> str:
    code = proc.exitcode
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


class Replacements:
    """With a parameter server, a lost worker is replaced while the others train on.

    The new worker resumes from the chief's latest checkpoint (its step count, schedules and
    replay buffer) and opens the next generation of its link, over which the server greets
    it with the current global weights. Lost ranks of the all-worker strategies, or the
    server itself, cannot be replaced in place (see ``_with_rebuilds``).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.count = 0
        self.generation: dict[Any, int] = {}

    def possible(self, killed: list[Any], failed: list[Any]) -> bool:
        """Whether the lost ranks can be replaced: only workers, and only of a server strategy."""
        if STOP or self.config.strategy not in SERVER_STRATEGIES or "server" in failed:
            return False
        if set(failed) != set(killed):  # a worker that raised would raise again
            return False
        if self.count + len(killed) > self.config.max_restarts:
            raise TrainingFailed(
                f"worker {killed[0]} was lost after {self.count} replacements, the limit "
                f"(--max-restarts {self.config.max_restarts}); checkpoints are in {self.config.run_dir}"
            )
        return True

    def replace(self, key: Any, kwargs: dict[str, Any], why: str) -> dict[str, Any]:
        """The arguments of the worker that replaces ``key``; logs why."""
        from shoal.run.checkpoint import latest

        self.count += 1
        self.generation[key] = self.generation.get(key, 0) + 1
        last = latest(Path(self.config.run_dir) / "checkpoints")
        log.warning(
            f"{why}; worker {key} is replaced by a new one (from "
            f"{f'checkpoint {last.name}' if last else 'the start'}) while the others train on "
            f"(replacement {self.count} of at most {self.config.max_restarts})"
        )
        return dict(kwargs, generation=self.generation[key], resume=str(last) if last else kwargs["resume"])


def _mp_attempt(job: dict[str, Any], progress: bool) -> dict[Any, dict]:
    import shutil
    import tempfile

    config: TrainConfig = job["config"]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    stop = ctx.Event()  # set on SIGINT/SIGTERM: every rank saves and returns (see Trainer.stop)
    scratch = tempfile.mkdtemp(prefix="shoal-group-")
    where = dict(rendezvous=f"file://{scratch}/rendezvous")
    tasks: list[tuple[Any, Any, dict]] = [
        (rank, run_worker, dict(rank=rank, progress=progress and rank == 0, **job, **where))
        for rank in range(config.num_workers)
    ]
    if config.strategy in SERVER_STRATEGIES:
        tasks.append(("server", run_server, dict(**job, **where)))

    def start(key: Any, fn: Any, kwargs: dict) -> Any:
        proc = ctx.Process(
            target=_mp_entry,
            name=f"shoal-train-{'worker-' if key != 'server' else ''}{key}",
            args=(key, fn, kwargs, results, os.getpid(), stop),
            daemon=False,  # workers start env worker processes of their own
        )
        proc.start()
        return proc

    procs = [start(*task) for task in tasks]
    replacements = Replacements(config)
    out: dict[Any, dict] = {}
    errors: dict[Any, RankError] = {}
    try:
        while len(out) < len(procs):
            if STOP and not stop.is_set():
                stop.set()
            while not results.empty():  # drain as results arrive, so no worker blocks on put
                key, value = results.get()
                if isinstance(value, RankError):
                    errors[key] = value
                else:
                    out[key] = value
            # (A rank killed after it returned its result has nothing left to lose or redo.)
            failed = [
                (key, p)
                for (key, _, _), p in zip(tasks, procs)
                if p.exitcode not in (None, 0) and not (key in out and p.exitcode < 0)
            ]
            if failed:
                # A killed rank makes its peers fail too (their gloo links break): give them a
                # moment, then blame the one killed by a signal if there is one.
                time.sleep(0.5)
                ranks = zip(tasks, procs)
                killed = [(key, p) for (key, _, _), p in ranks if (p.exitcode or 0) < 0 and key not in out]
                if killed and replacements.possible([k for k, _ in killed], [k for k, _ in failed]):
                    for key, p in killed:  # the others train on; a new worker takes the lost one's place
                        i = [k for k, _, _ in tasks].index(key)
                        _, fn, kwargs = tasks[i]
                        tasks[i] = (key, fn, replacements.replace(key, kwargs, f"{p.name} {_how(p)}"))
                        procs[i] = start(*tasks[i])
                    continue
                key, p = (killed or failed)[0]
                when = "after returning its result" if key in out else "before returning a result"
                why = f": {errors[key]}" if key in errors else ""
                raise (WorkerLost if killed else TrainingFailed)(f"{p.name} {_how(p)} {when}{why}")
            if results.empty() and len(out) < len(procs) and all(p.exitcode == 0 for p in procs):
                raise TrainingFailed("a training worker ended without a result")
            time.sleep(0.05)
        return {**out, "worker_replacements": replacements.count}
    finally:
        finished = len(out) == len(procs)
        for p in procs:
            p.join(10 if finished else 0)  # after a failure, the others are stopped at once
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(scratch, ignore_errors=True)  # only once no worker can touch the store


# -- ray: actors anywhere on a cluster -------------------------------------------------------
class _RayRank:
    """The Ray actor that hosts one rank of the group."""

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
        """Ask the rank's training loop to save and return (runs beside ``run``: 2 threads)."""
        from shoal.training.trainer import STOP

        STOP.request("stop")

    def run(self, fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        import faulthandler

        faulthandler.enable()  # a crash in native code (gloo, torch) still shows every thread's stack
        return fn(**kwargs)


class RayWorker(_RayRank):
    """A training worker (its own class so that `ray status` and process titles tell it apart)."""


class RayServer(_RayRank):
    """The parameter server."""


def _ray_start(config: TrainConfig) -> bool:
    """Connect to the given cluster, or start a local Ray bound to 127.0.0.1; True if started."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    if config.ray_address:
        ray.init(address=config.ray_address, logging_level=logging.WARNING)
        return False
    needed = config.num_workers * config.ray_cpus_per_worker
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(-(-needed // 1))),  # never wait for CPUs we lack
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    return True


def _train_ray(job: dict[str, Any], progress: bool) -> dict[Any, dict]:
    config: TrainConfig = job["config"]
    if not config.ray_address:  # Ray reads it once, on import: a local Ray binds 127.0.0.1 only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    started = _ray_start(config)
    try:
        return _with_rebuilds(lambda job: _ray_attempt(job, progress), job)
    finally:
        if started:
            ray.shutdown()


def _ray_attempt(job: dict[str, Any], progress: bool) -> dict[Any, dict]:
    import shutil
    import tempfile

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from shoal.configio import ConfigError

    config: TrainConfig = job["config"]
    scratch = tempfile.mkdtemp(prefix="shoal-group-")
    actors: list[Any] = []
    try:
        n = config.num_workers
        for kind, each in (("CPU", config.ray_cpus_per_worker), ("GPU", config.ray_gpus_per_worker)):
            have = ray.cluster_resources().get(kind, 0)
            if n * each > have:
                raise ConfigError(
                    f"{n} workers x {each:g} {kind}s need more than the cluster's {have:g} {kind}s;"
                    f" lower --num-workers or --ray-{kind.lower()}s-per-worker"
                )
        here = ray.get_runtime_context().get_node_id()
        keys: list[Any] = list(range(n)) + (["server"] if config.strategy in SERVER_STRATEGIES else [])

        def make_actor(key: Any) -> Any:
            # The chief and the server run beside the driver, so the run directory lands here.
            beside = key in (0, "server")
            actor = (
                ray.remote(RayServer if key == "server" else RayWorker)
                .options(
                    name=None,
                    max_concurrency=2,  # so that `stop` can run while `run` does
                    num_cpus=0 if key == "server" else config.ray_cpus_per_worker,
                    num_gpus=0 if key == "server" else config.ray_gpus_per_worker,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)
                    if beside
                    else "SPREAD",
                )
                .remote()
            )
            actors.append(actor)
            return actor

        for key in keys:
            make_actor(key)
        try:  # placement: resources can exist in total yet fit on no node
            places = ray.get([a.where.remote() for a in actors], timeout=120)
        except GetTimeoutError:
            raise ConfigError(
                f"Ray could not place {len(actors)} actors within 120 s; see `ray status` for free resources"
            ) from None
        nodes = {str(key): node for key, (node, _) in zip(keys, places)}
        # Every rank on this machine: a file rendezvous, so nothing listens beyond loopback
        # (torch's TCP store listens on every interface). Across machines: TCP on the node of
        # rank 0, or of the server, which hosts the store its links meet through.
        here_ip = ray.util.get_node_ip_address()
        if all(ip == here_ip for _, ip in places):
            rendezvous = f"file://{scratch}/rendezvous"
        else:
            rendezvous = ray.get(actors[-1 if keys[-1] == "server" else 0].rendezvous.remote())
        where = dict(rendezvous=rendezvous)
        refs: dict[Any, Any] = {}
        worker_kwargs: dict[Any, dict] = {}
        for key, actor in zip(keys, list(actors)):
            if key == "server":
                refs[key] = actor.run.remote(run_server, dict(**job, **where))
            else:
                worker_kwargs[key] = dict(rank=key, progress=progress and key == 0, **job, **where)
                refs[key] = actor.run.remote(run_worker, worker_kwargs[key])
        pending = list(refs.values())
        key_of = {ref: key for key, ref in refs.items()}
        name = {ref: "the server" if key == "server" else f"worker {key}" for key, ref in refs.items()}
        replacements = Replacements(config)
        stopping = False
        while pending:  # fail fast: the first failed actor's error, not a hang on the others
            if STOP and not stopping:  # SIGINT/SIGTERM: every rank saves and returns
                stopping = True
                for actor in actors:
                    actor.stop.remote()
            done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            if not done:
                continue
            try:
                ray.get(done)
            except RayActorError:
                key = key_of[done[0]]
                if key == "server" or not replacements.possible([key], [key]):
                    raise WorkerLost(f"the Ray actor of {name[done[0]]} died") from None
                why = f"the Ray actor of worker {key} died"
                worker_kwargs[key] = replacements.replace(key, worker_kwargs[key], why)
                refs[key] = make_actor(key).run.remote(run_worker, worker_kwargs[key])
                key_of[refs[key]], name[refs[key]] = key, f"worker {key}"
                pending.append(refs[key])
            except Exception as error:
                # A dead actor makes its peers fail too (their gloo links break): blame the dead one.
                ready, _ = ray.wait(pending, num_returns=len(pending), timeout=2.0) if pending else ([], [])
                for ref in [*done, *ready]:
                    try:
                        ray.get(ref)
                    except RayActorError:
                        raise WorkerLost(f"the Ray actor of {name[ref]} died") from None
                    except Exception:
                        pass
                if not isinstance(error, RayTaskError):
                    raise
                # The rank raised: not retried; its error in one line (its traceback is above).
                cause = error.cause if error.cause is not None else error
                text = " ".join(f"{type(cause).__name__}: {cause}".split())
                raise TrainingFailed(f"the Ray actor of {name[done[0]]} failed: {text}") from None
        results = {key: ray.get(ref) for key, ref in refs.items()}
        return {"nodes": nodes, "worker_replacements": replacements.count, **results}
    finally:
        for actor in actors:
            ray.kill(actor)
        shutil.rmtree(scratch, ignore_errors=True)

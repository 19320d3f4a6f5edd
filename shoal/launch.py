"""Backends: where training workers run.

- ``local``: one learner in this process.
- ``mp``: ``num_workers`` processes on this machine.
- ``ray``: ``num_workers`` Ray actors, placed by Ray on any machine of the cluster.

On ``mp`` and ``ray`` the workers (plus, for ``a3c`` and ``param-server``, the parameter
server as one more rank) join one torch.distributed group and run the same code:
:func:`run_worker` and :func:`run_server`. The backend only decides where those functions
run; the strategy decides how the workers cooperate; the algorithm knows neither.
"""

from __future__ import annotations

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
from shoal.strategy import ParamAvgStrategy, ServerStrategy, Strategy, SyncStrategy

STRATEGIES = ("sync", "a3c", "param-avg", "param-server")
BACKENDS = ("local", "mp", "ray")
SERVER_STRATEGIES = ("a3c", "param-server")


log = logging.getLogger("shoal")


class WorkerLost(RuntimeError):
    """A worker or the server died (killed, out of memory, its machine gone): rebuild the group."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def group_size(config: TrainConfig) -> int:
    """Ranks in the torch.distributed group: the workers, and the parameter server if any."""
    return config.num_workers + (config.strategy in SERVER_STRATEGIES)


def make_strategy(config: TrainConfig, rank: int) -> Strategy:
    n, compress, ratio = config.num_workers, config.compress, config.topk_ratio
    if config.strategy == "sync":
        return SyncStrategy(rank, n, compress, ratio)
    if config.strategy == "param-avg":
        return ParamAvgStrategy(rank, n, config.sync_every, compress, ratio)
    if config.strategy in SERVER_STRATEGIES:  # A3C does not even wait for the server's answer
        return ServerStrategy(rank, n, compress, ratio, pipelined=config.strategy == "a3c")
    raise ValueError(f"unknown strategy {config.strategy!r}; available: {', '.join(STRATEGIES)}")


def train(algo: str, config: TrainConfig, *, resume: Any = None, progress: bool = True) -> tuple[dict, str]:
    """Train with the config's backend; return (the chief's summary, the run directory)."""
    from shoal.algos import ALGORITHMS
    from shoal.trainer import Trainer, default_run_dir

    if config.backend == "local":
        trainer = Trainer(ALGORITHMS[algo], config, progress=progress)
        return trainer.train(resume=resume), str(trainer.run_dir)
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
    from shoal.checkpoint import latest

    config: TrainConfig = job["config"]
    rebuilds = 0
    while True:
        try:
            results = attempt(job)
            results["group_rebuilds"] = rebuilds
            return results
        except WorkerLost as lost:
            rebuilds += 1
            if rebuilds > config.max_restarts:
                raise RuntimeError(
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

    if rendezvous.startswith("file://"):  # gloo's own connections stay on loopback too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=size)


def run_worker(
    rank: int, algo: str, config: TrainConfig, resume: str | None, progress: bool, rendezvous: str
) -> dict[str, Any]:
    """Training worker ``rank``: its own envs and model copy, cooperating through the strategy."""
    import torch.distributed as dist

    from shoal.algos import ALGORITHMS
    from shoal.trainer import Trainer

    _join_group(rank, group_size(config), rendezvous)
    try:
        trainer = Trainer(ALGORITHMS[algo], config, strategy=make_strategy(config, rank), progress=progress)
        return trainer.train(resume=resume)
    finally:
        dist.destroy_process_group()


def run_server(algo: str, config: TrainConfig, resume: str | None, rendezvous: str) -> dict[str, Any]:
    """The parameter server: rank ``num_workers``, holding the global model and optimizer.

    It builds the algorithm exactly as the workers do (same seed, so the same initial
    weights) and, when resuming, loads the same checkpoint, so its weights and the workers'
    copies start equal without a message.
    """
    import torch
    import torch.distributed as dist

    from shoal import checkpoint as ckpt
    from shoal.algos import ALGORITHMS
    from shoal.server import ParameterServer
    from shoal.trainer import spaces_of

    _join_group(config.num_workers, group_size(config), rendezvous)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(config.seed)
        obs_space, action_space = spaces_of(config.env)
        algorithm = ALGORITHMS[algo](config, obs_space, action_space, torch.device("cpu"))
        if resume:
            arrays, _ = ckpt.load(resume)
            for name, module in algorithm.modules().items():
                ckpt.load_module(f"model/{name}", module, arrays)
        (optimizer,) = algorithm.optimizers().values()
        # A3C bounds staleness; the general parameter server applies every gradient (Downpour).
        a3c = config.strategy == "a3c"
        server = ParameterServer(
            optimizer,
            config.num_workers,
            "async" if a3c else config.ps_mode,
            config.max_policy_lag if a3c else None,
            config.compress,
            config.topk_ratio,
        )
        return server.serve()
    finally:
        dist.destroy_process_group()


# -- mp: processes on this machine -----------------------------------------------------------
def _exit_with_parent(parent_pid: int) -> None:
    """A training worker whose launcher died (even by SIGKILL) ends itself."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _mp_entry(key: Any, fn: Any, kwargs: dict, results: Any, parent_pid: int) -> None:
    import faulthandler

    faulthandler.enable()  # a crash in native code (gloo, torch) still shows every thread's stack
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C and stops us
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    code = 1
    try:
        results.put((key, fn(**kwargs)))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        # Leave without interpreter teardown: torch's gloo threads can abort the process
        # there ("terminate called without an active exception") after the work is done.
        # Files are closed and checkpoints fsynced by now; only the streams need a flush.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _train_mp(job: dict[str, Any], progress: bool) -> dict[Any, dict]:
    return _with_rebuilds(lambda job: _mp_attempt(job, progress), job)


def _mp_attempt(job: dict[str, Any], progress: bool) -> dict[Any, dict]:
    import shutil
    import tempfile

    config: TrainConfig = job["config"]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    scratch = tempfile.mkdtemp(prefix="shoal-group-")
    where = dict(rendezvous=f"file://{scratch}/rendezvous")
    tasks: list[tuple[Any, Any, dict]] = [
        (rank, run_worker, dict(rank=rank, progress=progress and rank == 0, **job, **where))
        for rank in range(config.num_workers)
    ]
    if config.strategy in SERVER_STRATEGIES:
        tasks.append(("server", run_server, dict(**job, **where)))
    procs = [
        ctx.Process(
            target=_mp_entry,
            name=f"shoal-train-{'worker-' if key != 'server' else ''}{key}",
            args=(key, fn, kwargs, results, os.getpid()),
            daemon=False,  # workers start env worker processes of their own
        )
        for key, fn, kwargs in tasks
    ]
    for p in procs:
        p.start()
    out: dict[Any, dict] = {}
    try:
        while len(out) < len(procs):
            while not results.empty():  # drain as results arrive, so no worker blocks on put
                key, value = results.get()
                out[key] = value
            failed = [(key, p) for (key, _, _), p in zip(tasks, procs) if p.exitcode not in (None, 0)]
            if failed:
                # A killed rank makes its peers fail too (their gloo links break): give them a
                # moment, then blame the one killed by a signal if there is one.
                time.sleep(0.5)
                killed = [(key, p) for (key, _, _), p in zip(tasks, procs) if (p.exitcode or 0) < 0]
                key, p = (killed or failed)[0]
                how = f"signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"code {p.exitcode}"
                when = "after returning its result" if key in out else "before returning a result"
                raise (WorkerLost if killed else RuntimeError)(f"{p.name} exited with {how} {when}")
            if results.empty() and len(out) < len(procs) and all(p.exitcode == 0 for p in procs):
                raise RuntimeError("a training worker ended without a result")
            time.sleep(0.05)
        return out
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
    from ray.exceptions import GetTimeoutError, RayActorError
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
        for key in keys:
            # The chief and the server run beside the driver, so the run directory lands here.
            beside = key in (0, "server")
            actors.append(
                ray.remote(RayServer if key == "server" else RayWorker)
                .options(
                    name=None,
                    num_cpus=0 if key == "server" else config.ray_cpus_per_worker,
                    num_gpus=0 if key == "server" else config.ray_gpus_per_worker,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)
                    if beside
                    else "SPREAD",
                )
                .remote()
            )
        try:  # placement: resources can exist in total yet fit on no node
            places = ray.get([a.where.remote() for a in actors], timeout=120)
        except GetTimeoutError:
            raise ConfigError(
                f"Ray could not place {len(actors)} actors within 120 s; see `ray status` for free resources"
            ) from None
        nodes = {str(key): node for key, (node, _) in zip(keys, places)}
        # Every rank on this machine: a file rendezvous, so nothing listens beyond loopback
        # (torch's TCP store listens on every interface). Across machines: TCP on rank 0's node.
        here_ip = ray.util.get_node_ip_address()
        if all(ip == here_ip for _, ip in places):
            rendezvous = f"file://{scratch}/rendezvous"
        else:
            rendezvous = ray.get(actors[0].rendezvous.remote())
        where = dict(rendezvous=rendezvous)
        refs = {}
        for key, actor in zip(keys, actors):
            if key == "server":
                refs[key] = actor.run.remote(run_server, dict(**job, **where))
            else:
                kwargs = dict(rank=key, progress=progress and key == 0, **job, **where)
                refs[key] = actor.run.remote(run_worker, kwargs)
        pending = list(refs.values())
        name = {ref: "the server" if key == "server" else f"worker {key}" for key, ref in refs.items()}
        while pending:  # fail fast: the first failed actor's error, not a hang on the others
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done)
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
                raise error
        return {"nodes": nodes, **{key: ray.get(ref) for key, ref in refs.items()}}
    finally:
        for actor in actors:
            ray.kill(actor)
        shutil.rmtree(scratch, ignore_errors=True)

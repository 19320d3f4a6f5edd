"""Backends: where training workers run. ``local`` is one learner in this process; ``mp``
starts ``num_workers`` processes on this machine joined in a torch.distributed (gloo) group
on 127.0.0.1, each with its own envs and model copy, cooperating through the strategy.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import socket
import threading
import time
from typing import Any

from shoal.config import TrainConfig

STRATEGIES = ("sync",)
BACKENDS = ("local", "mp")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_strategy(name: str, rank: int, world_size: int) -> Any:
    from shoal.strategy import SyncStrategy

    if name == "sync":
        return SyncStrategy(rank, world_size)
    raise ValueError(f"unknown strategy {name!r}; available: {', '.join(STRATEGIES)}")


def train(algo: str, config: TrainConfig, *, resume: Any = None, progress: bool = True) -> tuple[dict, str]:
    """Train with the config's backend; return (the chief's summary, the run directory)."""
    from shoal.algos import ALGORITHMS
    from shoal.trainer import Trainer

    if config.backend == "local":
        trainer = Trainer(ALGORITHMS[algo], config, progress=progress)
        return trainer.train(resume=resume), str(trainer.run_dir)
    return _train_mp(algo, config, resume, progress)


def _train_mp(algo: str, config: TrainConfig, resume: Any, progress: bool) -> tuple[dict, str]:
    from shoal.trainer import default_run_dir

    if config.run_dir is None:  # every worker must agree on it
        config = dataclasses.replace(config, run_dir=str(default_run_dir(algo, config)))
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            name=f"shoal-train-worker-{rank}",
            args=(
                rank,
                config.num_workers,
                port,
                algo,
                config,
                str(resume) if resume else None,
                progress and rank == 0,
                results,
                os.getpid(),
            ),
            daemon=False,  # workers start env worker processes of their own
        )
        for rank in range(config.num_workers)
    ]
    for p in procs:
        p.start()
    summaries = {}
    try:
        while any(p.is_alive() for p in procs):
            while not results.empty():  # drain as results arrive, so no worker blocks on put
                rank, summary = results.get()
                summaries[rank] = summary
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"training worker {failed[0].name} exited with code {failed[0].exitcode}")
            time.sleep(0.2)
        failed = [p for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"training worker {failed[0].name} exited with code {failed[0].exitcode}")
        while not results.empty():
            rank, summary = results.get()
            summaries[rank] = summary
        return summaries[0], config.run_dir
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def _exit_with_parent(parent_pid: int) -> None:
    """A training worker whose launcher died (even by SIGKILL) ends itself."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    algo: str,
    config: TrainConfig,
    resume: str | None,
    progress: bool,
    results: Any,
    parent_pid: int,
) -> None:
    import signal

    import torch.distributed as dist

    from shoal.algos import ALGORITHMS
    from shoal.trainer import Trainer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher handles Ctrl-C and stops us
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        strategy = make_strategy(config.strategy, rank, world_size)
        trainer = Trainer(ALGORITHMS[algo], config, strategy=strategy, progress=progress)
        summary = trainer.train(resume=resume)
        results.put((rank, summary))
    finally:
        dist.destroy_process_group()

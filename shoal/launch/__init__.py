"""Backends: where training workers run.

- ``local``: one learner in this process.
- ``mp``: ``num_workers`` processes on this machine (:mod:`shoal.launch.mp_backend`).
- ``ray``: ``num_workers`` Ray actors, placed by Ray on any machine of the cluster
  (:mod:`shoal.launch.ray_backend`).

On ``mp`` and ``ray`` one :class:`~shoal.launch.supervisor.Supervisor` starts the ranks of
the run's topology (:mod:`shoal.launch.ranks`: workers, and a parameter server for a3c and
param-server), watches them, replaces or rebuilds what is lost, and passes a stop on.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from shoal.config import TrainConfig
from shoal.launch.ranks import free_port
from shoal.launch.supervisor import Supervisor, Topology, TrainingFailed, WorkerLost
from shoal.run.checkpoint import write_text_atomic
from shoal.run.rundir import clean_stale_scratch, make_scratch_dir
from shoal.training.trainer import StopRequest

__all__ = ["train", "free_port", "TrainingFailed", "WorkerLost"]


def train(
    algo: str,
    config: TrainConfig,
    *,
    resume: Any = None,
    progress: bool = True,
    stop: StopRequest | None = None,
) -> tuple[dict, str]:
    """Train with the config's backend; return (the chief's summary, the run directory).

    ``stop``: set it (e.g. from a signal handler) to have every rank save and return.
    """
    from shoal.algos import ALGORITHMS
    from shoal.run.rundir import choose_run_dir
    from shoal.training.trainer import Trainer, default_run_dir

    stop = stop if stop is not None else StopRequest()
    if getattr(ALGORITHMS[algo], "decoupled", False):  # impala, appo: actor processes and one learner
        from shoal.training.decoupled import DecoupledTrainer

        trainer = DecoupledTrainer(ALGORITHMS[algo], config, progress=progress, stop=stop)
        return trainer.train(resume=resume), str(trainer.run_dir.resolve())
    if config.backend == "local":
        trainer = Trainer(ALGORITHMS[algo], config, progress=progress, stop=stop)
        return trainer.train(resume=resume), str(trainer.run_dir.resolve())
    if resume is not None:  # a damaged checkpoint is refused here, before any rank starts
        from shoal.run.checkpoint import load

        load(resume)
    # Every worker (and, on a cluster, every machine) must agree on one absolute run directory.
    run_dir = choose_run_dir(
        config.run_dir or default_run_dir(algo, config), explicit=bool(config.run_dir), claim=not resume
    )
    config = dataclasses.replace(config, run_dir=str(run_dir.resolve()))
    job = dict(algo=algo, config=config, resume=str(resume) if resume else None, progress=progress)
    results = _supervise(job, stop)
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
        write_text_atomic(written, json.dumps(summary, indent=1))
    return summary, config.run_dir


def _supervise(job: dict[str, Any], stop: StopRequest) -> dict[Any, Any]:
    """Run the job's topology on its backend under one supervisor."""
    config: TrainConfig = job["config"]
    clean_stale_scratch()  # left by launchers killed with SIGKILL
    scratch = str(make_scratch_dir())  # rendezvous files of the ranks on this machine, named by our pid
    try:
        if config.backend == "mp":
            from shoal.launch.mp_backend import MpBackend

            return Supervisor(MpBackend(scratch), Topology.of(config), job, stop).run()
        from shoal.launch.ray_backend import RayBackend, ray_start

        started = ray_start(config)
        try:
            backend = RayBackend(config, scratch)
            return {**Supervisor(backend, Topology.of(config), job, stop).run(), "nodes": backend.nodes}
        finally:
            if started:
                import ray

                ray.shutdown()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # only once no rank can touch the store

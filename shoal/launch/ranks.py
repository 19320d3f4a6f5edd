"""What runs in every rank, whatever the backend: a training worker or the parameter server.

A backend only decides where these functions run (a process here, a Ray actor anywhere);
the strategy decides how the workers cooperate; the algorithm knows neither.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path
from typing import Any

from shoal.config import TrainConfig
from shoal.distributed.names import SERVER_STRATEGIES, STRATEGIES, one_learner
from shoal.distributed.strategy import ParamAvgStrategy, ServerStrategy, Strategy, SyncStrategy
from shoal.training.trainer import StopRequest


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_strategy(config: TrainConfig, rank: int, link: Any = None) -> Strategy:
    n, compress, ratio = config.num_workers, config.compress, config.topk_ratio
    if config.strategy == "sync":
        return SyncStrategy(rank, n, compress, ratio)
    if config.strategy == "param-avg":
        return ParamAvgStrategy(rank, n, config.sync_every, compress, ratio)
    if config.strategy in SERVER_STRATEGIES:  # A3C does not even wait for the server's answer
        from shoal.distributed.wire import peer_timeout_of

        pipelined, timeout = config.strategy == "a3c", peer_timeout_of(config)
        averaged = one_learner(config.strategy, config.ps_mode)
        return ServerStrategy(
            rank, n, compress, ratio, pipelined, link, peer_timeout=timeout, averaged=averaged
        )
    raise ValueError(f"unknown strategy {config.strategy!r}; available: {', '.join(STRATEGIES)}")


def join_group(rank: int, size: int, rendezvous: str, timeout_s: float) -> None:
    """Join the group of all workers. A ``file://`` rendezvous means every rank is on this
    machine: nothing then listens beyond 127.0.0.1 (a TCP rendezvous store listens on every
    interface)."""
    import torch.distributed as dist

    from shoal.distributed.link import local_gloo

    local_gloo(rendezvous)
    # Past the supervisor's own hang detection, so that a peer that hangs is found and
    # killed by the supervisor (and the group rebuilt) before anyone's collective gives up.
    kwargs = {"timeout": datetime.timedelta(seconds=2 * timeout_s + 30)} if timeout_s > 0 else {}
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=size, **kwargs)


def run_worker(
    rank: int,
    algo: str,
    config: TrainConfig,
    resume: str | None,
    progress: bool,
    rendezvous: str,
    stop: StopRequest,
    generation: int = 0,
) -> dict[str, Any]:
    """Training worker ``rank``: its own envs and model copy, cooperating through the strategy.

    With a parameter server the worker opens its own link to it (``generation`` > 0: it
    replaces a lost worker); otherwise it joins the group of all workers.
    """
    import torch.distributed as dist

    from shoal.algos import ALGORITHMS
    from shoal.distributed.link import WORKER, Link, announce, open_store
    from shoal.run.checkpoint import CheckpointError, latest
    from shoal.training.trainer import Trainer

    def train(strategy: Strategy) -> dict[str, Any]:
        if generation == 0:
            return Trainer(ALGORITHMS[algo], config, strategy=strategy, progress=progress, stop=stop).train(
                resume=resume
            )
        # A replacement takes the chief's newest checkpoint as it starts, not the one that was
        # newest when it was launched: the chief trains on meanwhile and prunes old ones.
        for attempt in range(3):
            newest = latest(Path(config.run_dir) / "checkpoints") or resume
            trainer = Trainer(ALGORITHMS[algo], config, strategy=strategy, progress=progress, stop=stop)
            try:
                return trainer.train(resume=newest)
            except CheckpointError:
                if attempt == 2 or newest is None or Path(newest).exists():
                    raise  # damaged, not merely pruned under our feet
        return {}  # (not reached: the last attempt returns or raises)

    if config.strategy in SERVER_STRATEGIES:
        store = open_store(rendezvous, host=False)
        announce(store, rank, generation)
        return train(make_strategy(config, rank, Link(store, rank, generation, WORKER)))
    join_group(rank, config.num_workers, rendezvous, config.hang_timeout)
    try:
        return train(make_strategy(config, rank))
    finally:
        dist.destroy_process_group()


def run_server(
    algo: str, config: TrainConfig, resume: str | None, rendezvous: str, stop: StopRequest
) -> dict[str, Any]:
    """The parameter server, holding the global model and optimizer; it hosts the links' store.

    It builds the algorithm exactly as the workers do (same seed, so the same initial
    weights) and, when resuming, loads the same checkpoint; each worker is then greeted with
    the global weights when its link opens. It serves until every worker is done, stop
    request or not: the workers' own stops end it.
    """
    import torch

    from shoal.algos import ALGORITHMS
    from shoal.distributed.link import open_store
    from shoal.distributed.server import ParameterServer
    from shoal.distributed.wire import peer_timeout_of
    from shoal.run import checkpoint as ckpt
    from shoal.training.trainer import env_of, spaces_of

    store = open_store(rendezvous, host=True)
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    obs_space, action_space = spaces_of(env_of(config))
    algorithm = ALGORITHMS[algo](config, obs_space, action_space, torch.device("cpu"))
    if resume:
        arrays, meta = ckpt.load(resume)
        for name, module in algorithm.modules().items():
            ckpt.load_module(f"model/{name}", module, arrays)
        if "normalizer" in meta:  # the statistics, with the chief's data not merged yet
            norm = algorithm.normalizer
            norm.load(ckpt.under(arrays, "norm"), meta["normalizer"])
            norm.merge([norm.take_fresh()])
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
        normalizer=algorithm.normalizer,
    )
    return server.serve(store)

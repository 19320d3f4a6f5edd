"""Training configuration: one typed dataclass per algorithm, every field a CLI flag.

``TrainConfig`` holds what every algorithm shares; ``shoal.algos.<name>`` subclasses it with
its hyperparameters. Each field carries a one-line ``help`` in its metadata, from which the
CLI flags, the config-file schema and the docs are generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a one-line help string."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """What every algorithm's run needs, whatever the algorithm."""

    env: str = opt("CartPole-v1", "gymnasium env id")
    num_envs: int = opt(8, "parallel environments")
    total_steps: int = opt(100_000, "env steps to train for (summed over envs)")
    seed: int = opt(1, "run seed: envs, weights and sampling all derive from it")
    vectorization: str = opt("auto", "env stepping: auto|sync|process")
    env_workers: int | None = opt(None, "vector-env processes for vectorization=process (default: cores)")
    device: str = opt("auto", "learner device: auto|cpu|cuda")
    run_dir: str | None = opt(None, "where to write the run (default: runs/<env>-<algo>-<seed>-<time>)")
    eval_episodes: int = opt(20, "episodes of the final greedy evaluation")
    checkpoint_every: int = opt(0, "env steps between checkpoints (0: 10 per run)")
    keep_checkpoints: int = opt(3, "newest checkpoints kept (0: all); only the newest keeps a replay buffer")
    log_every: int = opt(2_000, "env steps between metric rows")
    torch_threads: int = opt(1, "torch CPU threads of the learner (small nets are fastest on 1)")
    backend: str = opt(
        "local", "where training workers run: local | mp (processes here) | ray (a Ray cluster)"
    )
    strategy: str = opt("sync", "how workers cooperate: sync | a3c | param-avg | param-server")
    num_workers: int = opt(1, "training workers (backend mp or ray); each has num_envs envs and a model copy")
    ps_mode: str = opt("async", "param-server: sync (the server waits for all workers) | async")
    max_policy_lag: int = opt(10, "a3c: drop gradients more than this many updates stale")
    sync_every: int = opt(10, "param-avg: optimizer steps between parameter averages (K)")
    compress: str = opt("none", "what gradients/parameters travel as: none | fp16 | topk")
    topk_ratio: float = opt(0.01, "compress topk: fraction of entries sent; the rest is carried forward")
    ray_address: str | None = opt(
        None, "backend ray: join this cluster (auto or HOST:PORT); default: a local Ray"
    )
    ray_cpus_per_worker: float = opt(1.0, "backend ray: CPUs each training worker reserves")
    ray_gpus_per_worker: float = opt(0.0, "backend ray: GPUs each training worker reserves")
    on_env_error: str = opt(
        "restart", "an env that raises, hangs or whose worker dies: restart it (fresh envs) | raise"
    )
    step_timeout: float = opt(
        60.0, "seconds an env step may take before its worker counts as hung (0: no limit)"
    )
    max_restarts: int = opt(
        10, "env-worker and training-worker restarts allowed before the run stops (with a checkpoint)"
    )
    nan_policy: str = opt(
        "raise", "NaN/inf in observations, rewards, loss or gradients: raise (stop, keep checkpoints) | skip"
    )

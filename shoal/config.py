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
    log_every: int = opt(2_000, "env steps between metric rows")
    torch_threads: int = opt(1, "torch CPU threads of the learner (small nets are fastest on 1)")
    backend: str = opt("local", "where training workers run: local (this process) | mp (processes here)")
    strategy: str = opt("sync", "how workers cooperate (backend mp): sync (all-reduced gradients)")
    num_workers: int = opt(1, "training workers (backend mp); each has num_envs envs and a model copy")

"""How training workers cooperate. An algorithm is handed one strategy and never asks more.

The algorithm calls ``reduce_gradients`` between ``backward()`` and ``optimizer.step()``,
and ``after_update`` after the step. A single process needs neither; synchronous
all-reduce, A3C, parameter averaging and a parameter server (the distributed strategies)
are implementations of these hooks, so the algorithm modules never change.
"""

from __future__ import annotations

import time

import torch
from torch import nn, optim


class Strategy:
    """One worker's view of the group it trains in."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_chief(self) -> bool:
        """The worker that writes the run directory, logs and checkpoints."""
        return self.rank == 0

    def worker_seed(self, seed: int) -> int:
        """Each worker's envs and sampling get their own seed, derived from the run seed."""
        return seed + 1_000_003 * self.rank

    def start(self, module: nn.Module) -> None:
        """Called once per network before training: make the workers' copies agree."""

    def reduce_gradients(self, module: nn.Module, samples: int = 1) -> None:
        """Combine this worker's gradients (from ``samples`` samples) with the group's, in place."""

    def after_update(self, module: nn.Module, optimizer: optim.Optimizer) -> None:
        """Bring this worker's weights in line with the group's after an optimizer step."""

    def mean(self, value: float) -> float:
        """The group's mean of a per-worker number (for decisions all workers must share)."""
        return value

    def metrics(self) -> dict[str, float]:
        """Communication counters for the metrics rows."""
        return {}


class LocalStrategy(Strategy):
    """One process, one learner: every hook does nothing."""


class SyncStrategy(Strategy):
    """Synchronous data parallelism (DD-PPO, sync SGD) over a torch.distributed process group.

    Every worker collects its own experience and computes gradients on it; one all-reduce of
    a single flattened buffer per optimizer step averages them, weighted by each worker's
    sample count, so the result is the gradient of the mean loss over everyone's samples.
    Every worker then applies the same update: weights never drift apart.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.bytes_sent = 0
        self.comm_seconds = 0.0

    def start(self, module: nn.Module) -> None:
        import torch.distributed as dist

        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def reduce_gradients(self, module: nn.Module, samples: int = 1) -> None:
        import torch.distributed as dist

        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.ones(1)]) * float(samples)
        start = time.perf_counter()
        dist.all_reduce(flat)
        self.comm_seconds += time.perf_counter() - start
        self.bytes_sent += flat.numel() * flat.element_size()
        flat = flat[:-1] / flat[-1]  # sum of samples x gradient, over the sum of samples
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def mean(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def metrics(self) -> dict[str, float]:
        return {"bytes_sent": float(self.bytes_sent), "comm_seconds": self.comm_seconds}

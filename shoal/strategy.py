"""How training workers cooperate. An algorithm is handed one strategy and never asks more.

The algorithm calls ``reduce_gradients`` between ``backward()`` and ``optimizer.step()``,
and ``after_update`` after the step. A single process needs neither; synchronous
all-reduce, A3C, parameter averaging and a parameter server (the distributed strategies)
are implementations of these two hooks, so the algorithm modules never change.
"""

from __future__ import annotations

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

    def reduce_gradients(self, module: nn.Module) -> None:
        """Combine this worker's gradients with the group's, in place."""

    def after_update(self, module: nn.Module, optimizer: optim.Optimizer) -> None:
        """Bring this worker's weights in line with the group's after an optimizer step."""


class LocalStrategy(Strategy):
    """One process, one learner: both hooks do nothing."""

"""The learner: every optimizer step of an algorithm, whatever the strategy.

An algorithm registers each (parameters, optimizer) pair it trains under a name (PPO and
DQN one, SAC three) and hands over losses: ``learner.step(name, loss, samples)``. The
learner then runs the sequence every algorithm used to copy, always in this order:

    zero_grad -> backward -> strategy's gradient exchange -> clip -> NaN guard -> step

The strategy decides what "exchange" and "step" mean (nothing, an all-reduce, a push to the
parameter server); the algorithm never sees it. The learning-rate schedule lives here too,
once: a linear decay from the configured rate, driven by the fraction of training left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import optim

from shoal.distributed.strategy import Strategy
from shoal.nn import clip_grad_norm


@dataclass
class Trained:
    """One (parameters, optimizer) pair and how its steps are taken."""

    params: list[torch.Tensor]
    optimizer: optim.Optimizer
    max_grad_norm: float | None  # None: no clipping
    learning_rate: float  # the start of the schedule
    anneal: bool  # decay linearly to 0 over training


class Learner:
    """Owns the optimizers of one algorithm and takes their steps through the strategy."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.trained: dict[str, Trained] = {}

    def add(
        self,
        name: str,
        params: list[torch.Tensor],
        optimizer: optim.Optimizer,
        *,
        max_grad_norm: float | None = None,
        anneal: bool = False,
    ) -> optim.Optimizer:
        """Register ``optimizer`` over ``params``; its configured rate starts the schedule."""
        lr = float(optimizer.param_groups[0]["lr"])
        self.trained[name] = Trained(list(params), optimizer, max_grad_norm, lr, anneal)
        return optimizer

    def optimizers(self) -> dict[str, optim.Optimizer]:
        """Every optimizer, by name (checkpoints and strategies see them in this order)."""
        return {name: t.optimizer for name, t in self.trained.items()}

    def schedule(self, fraction_left: float) -> float:
        """Set each optimizer's learning rate for this point of training; return the first's.

        ``fraction_left`` runs from 1 at the start to 0 at the end; an annealed rate is
        ``learning_rate * max(0, fraction_left)``, a constant one stays as configured.
        """
        rates = []
        for t in self.trained.values():
            lr = t.learning_rate * max(0.0, fraction_left) if t.anneal else t.learning_rate
            for group in t.optimizer.param_groups:
                group["lr"] = lr
            rates.append(lr)
        return rates[0]

    def step(self, name: str, loss: torch.Tensor, samples: int = 1) -> torch.Tensor | None:
        """One optimizer step of ``name`` on ``loss`` (from ``samples`` samples).

        Returns the gradient norm before clipping (None without clipping). A non-finite
        loss or gradient never reaches the weights: the strategy raises or skips the step
        (``--nan-policy``), after any exchange, so workers in lockstep decide alike.
        """
        t = self.trained[name]
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.strategy.reduce_gradients(t.params, samples=samples)
        grad_norm = clip_grad_norm(t.params, t.max_grad_norm) if t.max_grad_norm is not None else None
        self.strategy.step(t.optimizer, loss, grad_norm)
        return grad_norm

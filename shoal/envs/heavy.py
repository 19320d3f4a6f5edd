"""A CPU-heavy CartPole for benchmarks: the same dynamics, plus fixed pure-Python work per step.

The extra work is a fixed number of integer operations, not a timed spin, so it costs real
CPU: two processes on two cores run it twice as fast as one, and an oversubscribed machine
shows up as slower, never as faster.
"""

from __future__ import annotations

from typing import Any

from gymnasium.envs.classic_control.cartpole import CartPoleEnv

# About 200 us per step on the 2-core reference machine (see benchmarks/vector_envs.py).
DEFAULT_WORK = 3000


class HeavyCartPole(CartPoleEnv):
    """CartPole-v1 whose every step also burns ``work`` iterations of integer arithmetic."""

    def __init__(self, work: int = DEFAULT_WORK, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.work = int(work)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        x = 1
        for _ in range(self.work):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        return super().step(action)

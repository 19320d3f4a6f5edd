"""Small deterministic envs covering every space type, for the vector-env tests."""

from __future__ import annotations

import copy
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

OBS_SPACES: dict[str, spaces.Space] = {
    "box_f32": spaces.Box(-1.0, 1.0, (3,), np.float32),
    "box_f64_2d": spaces.Box(-5.0, 5.0, (2, 3), np.float64),
    "image_u8": spaces.Box(0, 255, (6, 5, 3), np.uint8),
    "box_i16": spaces.Box(-100, 100, (4,), np.int16),
    "discrete": spaces.Discrete(7, start=-2),
    "multidiscrete": spaces.MultiDiscrete([3, 5, 2]),
    "multibinary": spaces.MultiBinary(5),
    "dict": spaces.Dict(
        {
            "pos": spaces.Box(-1.0, 1.0, (2,), np.float32),
            "flag": spaces.Discrete(2),
            "nested": spaces.Tuple((spaces.MultiBinary(3), spaces.Box(0, 9, (1,), np.int64))),
        }
    ),
    "tuple": spaces.Tuple((spaces.Discrete(4), spaces.Dict({"a": spaces.Box(0, 1, (2,))}))),
}

ACTION_SPACES: dict[str, spaces.Space] = {
    "discrete": spaces.Discrete(3),
    "box": spaces.Box(-2.0, 2.0, (2,), np.float32),
    "multidiscrete": spaces.MultiDiscrete([2, 4]),
    "multibinary": spaces.MultiBinary(3),
    "dict": spaces.Dict({"move": spaces.Discrete(3), "force": spaces.Box(-1, 1, (1,), np.float32)}),
    "tuple": spaces.Tuple((spaces.Discrete(2), spaces.Box(0, 1, (2,), np.float32))),
}


def _action_number(action: Any) -> float:
    """A number derived from any action, so observations depend on the actions taken."""
    if isinstance(action, dict):
        return sum(_action_number(v) for v in action.values())
    if isinstance(action, tuple):
        return sum(_action_number(v) for v in action)
    return float(np.sum(np.asarray(action, dtype=np.float64)))


class SpaceEnv(gym.Env):
    """Random observations of any space; episode lengths vary; some infos on some steps."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        obs_space: str = "box_f32",
        action_space: str = "discrete",
        max_len: int = 9,
        step_sleep: float = 0.0,
        render_mode: str | None = None,
    ) -> None:
        # Own copies: a space carries a random generator, which envs must not share.
        self.observation_space = copy.deepcopy(OBS_SPACES[obs_space])
        self.action_space = copy.deepcopy(ACTION_SPACES[action_space])
        self.max_len = max_len
        self.step_sleep = step_sleep
        self.render_mode = render_mode
        self.t = 0
        self.length = max_len
        self.label = "unset"

    def _obs(self) -> Any:
        return self.observation_space.sample()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        self.t = 0
        self.length = int(self.np_random.integers(2, self.max_len + 1))
        info: dict[str, Any] = {"reset_marker": 1}
        if options and "note" in options:
            info["note"] = options["note"]
        return self._obs(), info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        assert self.action_space.contains(action), f"bad action {action!r}"
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self.t += 1
        reward = float(self.np_random.normal()) + _action_number(action)
        terminated = self.t >= self.length and self.t % 2 == 0
        truncated = self.t >= self.length and not terminated
        info: dict[str, Any] = {}
        if self.t % 3 == 0:
            info["every_third"] = self.t
            info["vec"] = np.full(2, self.t, dtype=np.float32)
        if terminated:
            info["episode_end"] = {"length": self.t}
        return self._obs(), reward, terminated, truncated, info

    def render(self) -> np.ndarray:
        return np.full((4, 4, 3), self.t, dtype=np.uint8)

    def double(self, x: int) -> int:
        return 2 * x + self.t


class TextEnv(SpaceEnv):
    """An observation space that gymnasium cannot put in shared memory."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.observation_space = spaces.Sequence(spaces.Discrete(4))


class FailingEnv(SpaceEnv):
    """Raises in step number ``fail_at`` (or in reset when ``fail_in_reset``)."""

    def __init__(self, fail_at: int = 3, fail_in_reset: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_at, self.fail_in_reset, self.steps = fail_at, fail_in_reset, 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        if self.fail_in_reset:
            raise KeyError("reset exploded")
        return super().reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        self.steps += 1
        if self.steps == self.fail_at:
            raise ValueError(f"step {self.steps} exploded")
        return super().step(action)


def fns(n: int, cls: type = SpaceEnv, **kwargs: Any) -> list:
    """``n`` env constructors."""
    return [lambda: cls(**kwargs) for _ in range(n)]


class TriggeredCartPole(gym.Wrapper):
    """CartPole that misbehaves when a trigger file exists: ``raise``, ``hang`` or ``always``.

    The trigger is a file so that one env in any process can take it: ``raise`` and ``hang``
    delete it first (exactly one env fails, once); ``always`` leaves it (every step fails).
    """

    def __init__(self, trigger: str, mode: str = "raise") -> None:
        super().__init__(gym.make("CartPole-v1"))
        self.trigger, self.mode = trigger, mode

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        import os

        if os.path.exists(self.trigger):
            if self.mode == "always":
                raise RuntimeError("injected fault (always)")
            try:
                os.remove(self.trigger)
            except FileNotFoundError:
                pass  # another env took it
            else:
                if self.mode == "hang":
                    time.sleep(3600)
                raise RuntimeError("injected fault")
        return self.env.step(action)

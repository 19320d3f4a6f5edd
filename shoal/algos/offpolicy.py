"""What SAC and TD3 share and is not their math: replay, warm-up, action scaling, state.

Both act in [-1, 1] (their policies end in tanh) and the env gets that action scaled to its
Box bounds; the replay buffer stores the [-1, 1] action and the RAW observation, and every
observation reaches a network through ``Algorithm._obs`` (one place to normalise them).
Like SB3, the first ``learning_starts`` env steps act uniformly at random; after that,
every ``train_freq`` env steps run ``gradient_steps`` minibatch updates (``update``, in each
algorithm's own module). The replay buffer, its sampling RNG and the counters are part of
the checkpoint, so a resume continues bitwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from shoal.algos.base import Algorithm
from shoal.buffers import ReplayBuffer
from shoal.config import (
    ENVS,
    MAX_NUM_ENVS,
    MAX_TORCH_THREADS,
    ConfigError,
    TrainConfig,
    check_replay_batch,
    opt,
    replay_share,
    show,
    space_bytes,
)
from shoal.distributed.strategy import Strategy
from shoal.nn import is_image


@dataclass
class OffPolicyConfig(TrainConfig):
    """The replay and schedule settings of SAC and TD3 (SB3's defaults)."""

    num_envs: int = opt(
        1, "parallel environments", group=ENVS, ge=1, le=MAX_NUM_ENVS, note="each env runs on this machine"
    )
    total_steps: int = opt(1_000_000, "env steps to train for (summed over envs)", ge=1)
    torch_threads: int = opt(
        0,
        "torch CPU threads of the learner (0: this machine's cores, shared by its workers; one"
        " gradient step of 256x256 networks at batch 256 per env step is worth the threads)",
        ge=0,
        le=MAX_TORCH_THREADS,
    )
    learning_rate: float = opt(3e-4, "Adam learning rate (every network)", gt=0)
    anneal_lr: bool = opt(False, "decay the learning rate linearly to 0 over training")
    buffer_size: int = opt(1_000_000, "replay buffer capacity (transitions)", ge=1, frozen=True)
    learning_starts: int = opt(100, "env steps of uniformly random actions before learning", ge=0)
    batch_size: int = opt(256, "transitions per gradient step", ge=1)
    gamma: float = opt(0.99, "discount factor", gt=0, le=1)
    tau: float = opt(0.005, "target network update rate (Polyak averaging)", gt=0, le=1)
    train_freq: int = opt(1, "env steps between training phases", ge=1)
    gradient_steps: int = opt(1, "gradient steps per training phase", ge=1)
    hidden: tuple[int, ...] = opt(
        (256, 256),
        "hidden layer sizes of actor and critics",
        item_ge=1,
        items="hidden layer sizes",
        frozen=True,
    )

    def validate(self, *, explicit: Iterable[str] = ()) -> None:
        super().validate(explicit=explicit)
        check_replay_batch(self)

    def check_spaces(self, algo: str, env: str, obs_space: Any, action_space: Any) -> None:
        if not isinstance(action_space, spaces.Box):
            raise ConfigError(
                f"{algo} needs continuous (Box) actions but {env} has {action_space}; use dqn or ppo"
            )
        if not (np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()):
            raise ConfigError(
                f"{algo} needs bounded actions (its policy ends in tanh); {env} has {action_space}"
            )
        if is_image(obs_space):
            raise ConfigError(f"{algo} takes vector observations, not frames; {env} has {show(obs_space)}")
        super().check_spaces(algo, env, obs_space, action_space)

    def memory_needed(self, obs_space: Any, action_space: Any) -> dict[str, float]:
        # obs and next obs as the env gives them, the action, its reward and discount
        row = 2.0 * space_bytes(obs_space) + space_bytes(action_space) + 8
        return {"buffer_size": replay_share(self) * row}


class OffPolicyAlgorithm(Algorithm):
    """Replay, warm-up and state for a continuous-action actor-critic learning off-policy."""

    def __init__(
        self,
        config: OffPolicyConfig,
        obs_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device,
        strategy: Strategy | None = None,
    ) -> None:
        if not isinstance(action_space, spaces.Box):
            raise ValueError(f"{type(self).__name__} needs a Box action space, got {action_space}")
        super().__init__(config, obs_space, action_space, device, strategy)
        c = config
        self.obs_size = int(np.prod(obs_space.shape)) if obs_space.shape else 1
        self.act_size = int(np.prod(action_space.shape))
        self.low = action_space.low.reshape(-1).astype(np.float64)
        self.half_range = 0.5 * (action_space.high.reshape(-1).astype(np.float64) - self.low)
        sample = np.asarray(obs_space.sample())
        self.replay = ReplayBuffer(
            self.replay_capacity(c.buffer_size),
            c.num_envs,
            sample.shape,
            sample.dtype,
            (self.act_size,),
            np.float32,
            1,
            c.gamma,
        )
        self.rng = np.random.default_rng(self.strategy.worker_seed(c.seed))
        self.env_steps = 0
        self.last_train = 0  # env steps at the last training phase

    # -- acting ---------------------------------------------------------------------------
    def policy_actions(self, obs: torch.Tensor) -> torch.Tensor:
        """Exploring actions in [-1, 1] for a batch of observations (the algorithm's own)."""
        raise NotImplementedError

    def act(self, obs: np.ndarray) -> np.ndarray:
        if self.env_steps < self.config.learning_starts:
            actions = self.rng.uniform(-1.0, 1.0, (len(obs), self.act_size)).astype(np.float32)
        else:
            with torch.inference_mode():
                actions = self.policy_actions(self._obs(obs)).cpu().numpy()
        self._last = (obs, actions)
        return self.to_bounds(actions)

    def to_bounds(self, actions: np.ndarray) -> np.ndarray:
        """[-1, 1] actions as the env takes them: scaled to the Box, in its shape and dtype."""
        space = self.action_space
        scaled = self.low + (actions + 1.0) * self.half_range
        return np.clip(scaled.reshape((-1, *space.shape)), space.low, space.high).astype(space.dtype)

    def record(self, rewards, terminated, truncated, next_obs, valid, env_steps) -> None:  # noqa: ANN001
        obs, actions = self._last
        self.replay.add(obs, actions, rewards, next_obs, terminated, truncated, valid)
        self.env_steps = env_steps

    def ready(self) -> bool:
        c = self.config
        started = self.env_steps >= c.learning_starts and self.replay.size >= 1
        return started and self.env_steps - self.last_train >= self.replay_interval(c.train_freq)

    # -- learning -------------------------------------------------------------------------
    def sample(self) -> tuple[torch.Tensor, ...]:
        """A minibatch (obs, actions, rewards, next obs, discounts) as tensors on the device:
        this worker's share of ``batch_size``.

        ``discounts`` is gamma, or 0 after a termination (a truncation still bootstraps).
        """
        batch = self.replay_batch(self.config.batch_size)
        obs, actions, rewards, next_obs, discounts = self.replay.sample(batch, self.rng)
        as_t = torch.as_tensor
        return (
            self._obs(obs),
            as_t(actions, device=self.device),
            as_t(self._rewards(rewards), device=self.device),  # scaled when --normalize-reward
            self._obs(next_obs),
            as_t(discounts, device=self.device),
        )

    @staticmethod
    def polyak(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
        """target <- (1 - tau) target + tau online, every tensor in one call."""
        with torch.no_grad():
            torch._foreach_lerp_(target, online, tau)

    def on_new_episodes(self) -> None:
        self.replay.clear_pending()

    def cut_episodes(self, envs: np.ndarray) -> None:
        self.replay.clear_pending(envs)

    # -- state ----------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The integers that, with the replay and RNGs, make a resume exact."""
        return {"env_steps": self.env_steps, "last_train": self.last_train}

    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = self.replay.state()
        return (
            {f"heavy/replay/{k}": v for k, v in arrays.items()},  # heavy: in the newest checkpoint only
            {"replay": meta, "rng": self.rng.bit_generator.state, **self.counters()},
        )

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.replay.load(
            {k.rsplit("/", 1)[1]: v for k, v in arrays.items() if k.startswith(("heavy/replay/", "replay/"))},
            meta["replay"],
        )
        self.rng.bit_generator.state = meta["rng"]
        for name in self.counters():
            setattr(self, name, int(meta[name]))

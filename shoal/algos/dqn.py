"""Deep Q-Network (Mnih et al., 2015) with a double-DQN target (van Hasselt et al., 2016).

Read top to bottom: epsilon-greedy acting with a linearly decaying epsilon, transitions
into a replay buffer (optionally as n-step returns), and every ``train_freq`` env steps
``gradient_steps`` minibatch updates of the Huber loss against
``r + discount * Q_target(s', argmax_a Q(s', a))``; the target network is copied (or
Polyak-averaged with ``tau < 1``) every ``target_update_interval`` env steps. Several
workers share these schedules and the batch as ``Algorithm.replay_interval`` says.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F

from shoal.algos.base import Algorithm, fused_ok
from shoal.buffers import FrameReplayBuffer, make_replay, stacked_frames
from shoal.config import (
    ConfigError,
    TrainConfig,
    check_replay_batch,
    opt,
    replay_share,
    space_bytes,
    space_inputs,
)
from shoal.nn import QNetwork


def td_target(
    q: nn.Module,
    q_target: nn.Module,
    returns: torch.Tensor,
    next_obs: torch.Tensor,
    discounts: torch.Tensor,
    double_q: bool,
) -> torch.Tensor:
    """``R + discount * Q_target(s', a*)``: a* from the online net (double DQN) or the target."""
    next_q = q_target(next_obs)
    best = (q(next_obs) if double_q else next_q).argmax(-1, keepdim=True)
    return returns + discounts * next_q.gather(-1, best).squeeze(-1)


@dataclass
class DQNConfig(TrainConfig):
    """DQN's hyperparameters; ``validate`` and ``check_spaces`` add what replay and argmax need."""

    learning_rate: float = opt(1e-4, "Adam learning rate", gt=0)
    anneal_lr: bool = opt(False, "decay the learning rate linearly to 0 over training")
    buffer_size: int = opt(100_000, "replay buffer capacity (transitions)", ge=1, frozen=True)
    learning_starts: int = opt(1_000, "env steps of pure exploration before learning", ge=0)
    batch_size: int = opt(64, "transitions per gradient step", ge=1)
    gamma: float = opt(0.99, "discount factor", gt=0, le=1)
    n_step: int = opt(1, "n-step returns (1: plain one-step targets)", ge=1)
    train_freq: int = opt(4, "env steps between training phases", ge=1)
    gradient_steps: int = opt(1, "gradient steps per training phase", ge=1)
    target_update_interval: int = opt(1_000, "env steps between target network updates", ge=1)
    tau: float = opt(1.0, "target update rate (1.0: hard copy)", gt=0, le=1)
    double_q: bool = opt(True, "double-DQN target")
    exploration_fraction: float = opt(0.1, "fraction of training over which epsilon decays", ge=0, le=1)
    exploration_initial_eps: float = opt(1.0, "epsilon at the start", ge=0, le=1)
    exploration_final_eps: float = opt(0.05, "epsilon after the decay", ge=0, le=1)
    max_grad_norm: float = opt(10.0, "gradient norm clip", gt=0)
    hidden: tuple[int, ...] = opt(
        (64, 64), "hidden layer sizes of the Q-network", item_ge=1, items="hidden layer sizes", frozen=True
    )

    def validate(self, *, explicit: Iterable[str] = ()) -> None:
        super().validate(explicit=explicit)
        check_replay_batch(self)

    def check_spaces(self, algo: str, env: str, obs_space: Any, action_space: Any) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise ConfigError(f"dqn needs discrete actions but {env} has {action_space}; use ppo or a2c")
        super().check_spaces(algo, env, obs_space, action_space)

    def memory_needed(self, obs_space: Any, action_space: Any) -> dict[str, float]:
        # online + target network, gradient, two Adam moments; a batch's activations
        widths = [space_inputs(obs_space), *self.hidden]
        weights = sum(a * b for a, b in zip(widths, widths[1:])) + widths[-1] * 64
        shape = obs_space.shape or ()
        if obs_space.dtype is not None and stacked_frames(shape, obs_space.dtype):  # FrameReplayBuffer's
            replay = FrameReplayBuffer.nbytes(replay_share(self), self.num_envs, shape, 8, self.n_step)
        else:  # obs and next obs whole, the int64 action, return and discount
            replay = replay_share(self) * (2.0 * space_bytes(obs_space) + 8 + 8)
        return {
            "buffer_size": float(replay),
            "hidden": 5 * 4 * weights + 4 * 4 * self.batch_size * sum(widths),
        }


class DQN(Algorithm):
    name = "dqn"
    config_class = DQNConfig

    def __init__(self, config: DQNConfig, obs_space, action_space, device, strategy=None) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"DQN needs a Discrete action space, got {action_space}; use PPO or A2C")
        super().__init__(config, obs_space, action_space, device, strategy)
        c = config
        self.q = QNetwork(obs_space, action_space, c.hidden).to(device)
        self.q_target = copy.deepcopy(self.q)
        adam = torch.optim.Adam(self.q.parameters(), lr=c.learning_rate, fused=fused_ok(device))
        self.learner.add(
            "optimizer", self.q.parameters(), adam, max_grad_norm=c.max_grad_norm, anneal=c.anneal_lr
        )
        sample = np.asarray(obs_space.sample())
        self.replay = make_replay(  # stacked frames (Atari): each frame stored once
            self.replay_capacity(c.buffer_size),
            c.num_envs,
            sample.shape,
            sample.dtype,
            (),
            np.int64,
            c.n_step,
            c.gamma,
        )
        self.rng = np.random.default_rng(self.strategy.worker_seed(c.seed))
        self.env_steps = 0
        self.last_train = 0  # env steps at the last training phase
        self.last_target = 0  # env steps at the last target update

    def epsilon(self) -> float:
        c = self.config
        frac = min(1.0, self.env_steps / max(1.0, c.exploration_fraction * c.total_steps))
        return c.exploration_initial_eps + frac * (c.exploration_final_eps - c.exploration_initial_eps)

    # -- acting ---------------------------------------------------------------------------
    def act(self, obs: np.ndarray) -> np.ndarray:
        greedy = self.predict(obs)
        explore = self.rng.random(len(greedy)) < self.epsilon()
        actions = np.where(explore, self.rng.integers(0, self.action_space.n, len(greedy)), greedy)
        self._last = (obs, actions)
        return actions

    def predict(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        with torch.inference_mode():
            return self.q(self._obs(obs)).argmax(-1).cpu().numpy()

    def record(self, rewards, terminated, truncated, next_obs, valid, env_steps) -> None:
        obs, actions = self._last
        self.replay.add(obs, actions, rewards, next_obs, terminated, truncated, valid)
        self.env_steps = env_steps
        c = self.config
        if env_steps - self.last_target >= self.replay_interval(c.target_update_interval):
            self.last_target = env_steps
            with torch.no_grad():
                for target, online in zip(self.q_target.parameters(), self.q.parameters()):
                    target.lerp_(online, c.tau)

    def ready(self) -> bool:
        c = self.config
        started = self.env_steps >= c.learning_starts and self.replay.size > 0  # n-step: none stored yet
        return started and self.env_steps - self.last_train >= self.replay_interval(c.train_freq)

    # -- learning -------------------------------------------------------------------------
    def update(self, next_obs: np.ndarray, env_steps: int) -> dict[str, float]:
        c = self.config
        steps = self.gradient_steps_due(env_steps)
        lr = self.learner.schedule(1.0 - env_steps / c.total_steps)
        batch = self.replay_batch(c.batch_size)  # with several workers: see Algorithm.replay_batch
        losses, q_means = [], []
        for _ in range(steps):
            obs, actions, returns, next_o, discounts = self.replay.sample(batch, self.rng)
            # Raw observations and rewards are stored; they are normalised with today's statistics.
            obs, next_o = self._obs(obs), self._obs(next_o)
            actions, returns, discounts = (
                torch.as_tensor(x, device=self.device) for x in (actions, self._rewards(returns), discounts)
            )
            with torch.no_grad():
                target = td_target(self.q, self.q_target, returns, next_o, discounts, c.double_q)
            q = self.q(obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            loss = F.smooth_l1_loss(q, target)

            self.learner.step("optimizer", loss, samples=batch)
            losses.append(loss.detach())
            q_means.append(q.detach().mean())
        self.updates += 1
        loss_mean, q_mean = torch.stack([torch.stack(losses).mean(), torch.stack(q_means).mean()]).tolist()
        return {
            "q_loss": loss_mean,
            "q_mean": q_mean,
            "epsilon": self.epsilon(),
            "learning_rate": lr,
        }

    def on_new_episodes(self) -> None:
        self.replay.clear_pending()

    def cut_episodes(self, envs: np.ndarray) -> None:
        self.replay.clear_pending(envs)  # at most n_step - 1 transitions whose return is unknown

    # -- state ----------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"q": self.q, "q_target": self.q_target}

    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = self.replay.state()
        return (
            {f"heavy/replay/{k}": v for k, v in arrays.items()},  # heavy: in the newest checkpoint only
            {
                "replay": meta,
                "rng": self.rng.bit_generator.state,
                "env_steps": self.env_steps,
                "last_train": self.last_train,
                "last_target": self.last_target,
            },
        )

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.replay.load(
            {k.rsplit("/", 1)[1]: v for k, v in arrays.items() if k.startswith(("heavy/replay/", "replay/"))},
            meta["replay"],
        )
        self.rng.bit_generator.state = meta["rng"]
        self.env_steps, self.last_train, self.last_target = (
            meta["env_steps"],
            meta["last_train"],
            meta["last_target"],
        )


PRESETS: dict[str, dict] = {
    # RL-Baselines3-Zoo's CartPole hyperparameters, but a learning rate of 1e-3 instead of
    # 2.3e-3: 4 of seeds 1-5 then solve (5 of seeds 1-7), against 1 of 5 with 2.3e-3.
    "CartPole-v1": dict(
        num_envs=1,
        learning_rate=1e-3,
        batch_size=64,
        buffer_size=100_000,
        learning_starts=1_000,
        gamma=0.99,
        target_update_interval=10,
        train_freq=256,
        gradient_steps=128,
        exploration_fraction=0.16,
        exploration_final_eps=0.04,
        hidden=(256, 256),
        total_steps=50_000,
    ),
    "Acrobot-v1": dict(
        num_envs=1,
        learning_rate=6.3e-4,
        batch_size=128,
        buffer_size=50_000,
        learning_starts=0,
        gamma=0.99,
        target_update_interval=250,
        train_freq=4,
        gradient_steps=4,
        exploration_fraction=0.12,
        exploration_final_eps=0.1,
        hidden=(256, 256),
        total_steps=100_000,
    ),
    # Every Atari game: RL-Zoo's dqn.yml "atari" entry (its master; older revisions kept 10k
    # or 1M transitions). 100k transitions of 4x84x84 uint8 frames take 0.8 GB (docs/atari.md).
    "ALE/*": dict(
        num_envs=1,
        buffer_size=100_000,
        learning_rate=1e-4,
        batch_size=32,
        learning_starts=100_000,
        target_update_interval=1_000,
        train_freq=4,
        gradient_steps=1,
        exploration_fraction=0.1,
        exploration_final_eps=0.01,
        gamma=0.99,
        total_steps=10_000_000,
    ),
}
PRESETS["*NoFrameskip-v4"] = PRESETS["ALE/*"]  # the v4 ids shoal preprocesses too
DQN.presets = PRESETS

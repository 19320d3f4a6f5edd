"""Advantage Actor-Critic (Mnih et al., 2016), the synchronous variant.

Read top to bottom: short rollouts (``num_steps`` per env), advantages by GAE (lambda 1
gives the paper's n-step returns), then ONE gradient step on policy loss, value loss and
entropy bonus, with RMSprop as in the paper. Run with ``--strategy a3c`` (distributed
training) it becomes A3C: workers apply these same gradients asynchronously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from shoal.algos.base import ActorCriticAlgorithm
from shoal.buffers import gae
from shoal.config import (
    TrainConfig,
    activation_opt,
    normalization,
    opt,
    ortho_init_opt,
    rollout_memory,
    vf_coef_opt,
)


@dataclass
class A2CConfig(TrainConfig):
    """A2C's hyperparameters (RMSprop, as in the paper)."""

    num_steps: int = opt(5, "steps per env between updates", ge=1)
    learning_rate: float = opt(7e-4, "RMSprop learning rate", gt=0)
    anneal_lr: bool = opt(False, "decay the learning rate linearly to 0 over training")
    gamma: float = opt(0.99, "discount factor", gt=0, le=1)
    gae_lambda: float = opt(1.0, "GAE lambda (1.0: plain n-step returns)", ge=0, le=1)
    norm_adv: bool = opt(False, "normalise advantages over each rollout")
    ent_coef: float = opt(0.0, "entropy bonus coefficient", ge=0)
    vf_coef: float = vf_coef_opt()
    max_grad_norm: float = opt(0.5, "gradient norm clip", gt=0)
    rms_alpha: float = opt(0.99, "RMSprop smoothing constant", ge=0, lt=1)
    rms_eps: float = opt(1e-5, "RMSprop epsilon", gt=0)
    hidden: tuple[int, ...] = opt(
        (64, 64), "hidden layer sizes of actor and critic", item_ge=1, items="hidden layer sizes", frozen=True
    )
    activation: str = activation_opt()
    ortho_init: bool = ortho_init_opt()
    log_std_init: float = opt(
        0.0, "initial log standard deviation (continuous actions)", ge=-20, le=20, note="the std is its exp"
    )

    @classmethod
    def space_defaults(cls, obs_space: Any, action_space: Any) -> dict[str, Any]:
        """Box actions: observations and rewards normalised (as RL-Zoo's A2C on MuJoCo)."""
        return {
            **super().space_defaults(obs_space, action_space),
            **normalization(obs_space, on=isinstance(action_space, spaces.Box)),
        }

    def memory_needed(self, obs_space: Any, action_space: Any) -> dict[str, float]:
        return rollout_memory(self, obs_space, action_space)


class A2C(ActorCriticAlgorithm):
    name = "a2c"
    config_class = A2CConfig

    def __init__(self, config: A2CConfig, obs_space, action_space, device, strategy=None) -> None:
        super().__init__(config, obs_space, action_space, device, strategy)
        rmsprop = torch.optim.RMSprop(
            self.net.parameters(), lr=config.learning_rate, alpha=config.rms_alpha, eps=config.rms_eps
        )
        self.learner.add(
            "optimizer",
            self.net.parameters(),
            rmsprop,
            max_grad_norm=config.max_grad_norm,
            anneal=config.anneal_lr,
        )

    def update(self, next_obs: np.ndarray, env_steps: int) -> dict[str, float]:
        c, b, net = self.config, self.buffer, self.net
        lr = self.learner.schedule(1.0 - self.updates / self.total_updates)
        with torch.no_grad():
            next_value = net.value(self._obs(next_obs))
            advantages = gae(b.rewards, b.values, next_value, b.terminated, b.done, c.gamma, c.gae_lambda)
            returns = advantages + b.values
        obs, actions, advantages, returns = b.valid_samples(b.obs, b.actions, advantages, returns)
        if c.norm_adv and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        logprob, entropy, value = net.evaluate(obs, actions)
        pg_loss = -(advantages * logprob).mean()
        v_loss = 0.5 * ((returns - value) ** 2).mean()
        ent = entropy.mean()
        loss = pg_loss - c.ent_coef * ent + c.vf_coef * v_loss

        self.learner.step("optimizer", loss, samples=len(advantages))
        self.updates += 1
        b.clear()
        pg, vl, en = torch.stack([pg_loss, v_loss, ent]).tolist()
        return {"policy_loss": pg, "value_loss": vl, "entropy": en, "learning_rate": lr}


PRESETS: dict[str, dict] = {
    "CartPole-v1": dict(num_envs=8, ent_coef=0.0, total_steps=500_000),
    "Acrobot-v1": dict(num_envs=16, ent_coef=0.0, norm_adv=False, total_steps=500_000),
    "Pendulum-v1": dict(
        num_envs=8,
        num_steps=8,
        gae_lambda=0.9,
        gamma=0.9,
        ent_coef=0.0,
        max_grad_norm=0.5,
        learning_rate=7e-4,
        log_std_init=-2.0,
        total_steps=1_000_000,
        normalize_obs=False,  # tuned and measured without normalisation
        normalize_reward=False,
    ),
    # Every Atari game: RL-Zoo's a2c.yml "atari" entry, the rest SB3's A2C defaults (which are
    # shoal's: 5 steps, lr 7e-4, RMSprop alpha 0.99 eps 1e-5, lambda 1, grad norm 0.5). The
    # zoo's RMSpropTFLike puts eps inside the square root; torch's RMSprop, here, outside. Its
    # vf_coef 0.25 weighs SB3's whole squared error: 0.5 here, where the loss is half of it.
    "ALE/*": dict(num_envs=16, ent_coef=0.01, vf_coef=0.5, total_steps=10_000_000),
}
PRESETS["*NoFrameskip-v4"] = PRESETS["ALE/*"]  # the v4 ids shoal preprocesses too
A2C.presets = PRESETS

"""Proximal Policy Optimization (Schulman et al., 2017), clipped objective.

Read top to bottom: the config, acting (sample an action, remember its log-probability and
the state's value), recording the step, then the update: advantages by GAE, normalised,
and several epochs of minibatch steps on the clipped surrogate, the (optionally clipped)
value loss and an entropy bonus, with gradient-norm clipping and a linearly annealed
learning rate (and, optionally, clip range).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from shoal.algos.base import ActorCriticAlgorithm, fused_ok
from shoal.buffers import gae
from shoal.config import (
    ConfigError,
    TrainConfig,
    activation_opt,
    is_pixels,
    normalization,
    opt,
    ortho_init_opt,
    rollout_memory,
    vf_coef_opt,
)

# Defaults by action space (``PPOConfig.space_defaults``; an env's preset overrides them).
# The dataclass defaults are CleanRL's ppo.py values (8 envs x 128 steps, 4 minibatches x 4
# epochs, lr 2.5e-4, entropy 0.01; its Atari script's too, clip range aside), kept for pixels.
# On vector observations they barely move the policy (LunarLander-v3, 300k steps: KL ~1e-5
# per update, no ratio ever clipped, greedy return -811): 16 minibatch steps per 1,024
# transitions, and unscaled returns give a value loss in the hundreds (explained variance ~0)
# beside a policy loss of ~1e-3, under one clipped gradient norm. There, as SB3 and CleanRL's
# continuous-control script do: 2,048 transitions per update in minibatches of 64, 10 epochs,
# lr 3e-4, no entropy bonus, with observations and rewards normalised.
DISCRETE: dict[str, Any] = dict(
    num_steps=256, num_minibatches=32, update_epochs=10, learning_rate=3e-4, gamma=0.99, ent_coef=0.0
)
# Box actions (continuous control): the same 2,048 transitions per update (SB3's 1 env x
# 2,048 steps; shoal's 8 envs x 2,048 would make a 1M-step budget 61 updates), collected by
# 4 envs x 512 steps: the same updates per budget, a quarter of the policy calls (one per
# vector step). GAE lambda 0.95; actions clipped to the space (``Algorithm._to_env``).
CONTINUOUS: dict[str, Any] = dict(DISCRETE, num_envs=4, num_steps=512, gae_lambda=0.95)


@dataclass
class PPOConfig(TrainConfig):
    """PPO's hyperparameters; ``validate`` adds the minibatch-vs-rollout rule."""

    num_steps: int = opt(128, "steps per env between updates (rollout length)", ge=1)
    learning_rate: float = opt(2.5e-4, "Adam learning rate", gt=0)
    anneal_lr: bool = opt(True, "decay the learning rate linearly to 0 over training")
    gamma: float = opt(0.99, "discount factor", gt=0, le=1)
    gae_lambda: float = opt(0.95, "GAE lambda", ge=0, le=1)
    num_minibatches: int = opt(4, "minibatches per epoch", ge=1)
    update_epochs: int = opt(4, "passes over each rollout", ge=1)
    norm_adv: bool = opt(True, "normalise advantages within each minibatch")
    clip_coef: float = opt(0.2, "surrogate clipping range", gt=0)
    anneal_clip: bool = opt(False, "decay the clipping range linearly to 0 over training")
    clip_vloss: bool = opt(True, "clip the value loss like the policy")
    ent_coef: float = opt(0.01, "entropy bonus coefficient", ge=0)
    vf_coef: float = vf_coef_opt()
    max_grad_norm: float = opt(0.5, "gradient norm clip", gt=0)
    target_kl: float | None = opt(None, "stop the epochs early past this KL (None: never)", gt=0)
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
        """Box actions: ``CONTINUOUS``; discrete actions on vectors: ``DISCRETE``; pixels: the
        dataclass defaults. Observations and rewards normalised, except pixels."""
        out = {**super().space_defaults(obs_space, action_space), **normalization(obs_space)}
        if isinstance(action_space, spaces.Box):
            out.update(CONTINUOUS)
        elif not is_pixels(obs_space):
            out.update(DISCRETE)
        return out

    def validate(self, *, explicit: Iterable[str] = ()) -> None:
        super().validate(explicit=explicit)
        rows = self.num_steps * self.num_envs
        if self.num_minibatches > rows:
            raise ConfigError(
                f"num_minibatches {self.num_minibatches} is more than the {rows} transitions of a rollout"
                f" (num_steps {self.num_steps} x num_envs {self.num_envs}); lower --num-minibatches"
            )

    def memory_needed(self, obs_space: Any, action_space: Any) -> dict[str, float]:
        return rollout_memory(self, obs_space, action_space)


class PPO(ActorCriticAlgorithm):
    name = "ppo"
    config_class = PPOConfig

    def __init__(self, config: PPOConfig, obs_space, action_space, device, strategy=None) -> None:
        super().__init__(config, obs_space, action_space, device, strategy)
        adam = torch.optim.Adam(
            self.net.parameters(), lr=config.learning_rate, eps=1e-5, fused=fused_ok(device)
        )
        self.learner.add(
            "optimizer",
            self.net.parameters(),
            adam,
            max_grad_norm=config.max_grad_norm,
            anneal=config.anneal_lr,
        )

    # -- learning -------------------------------------------------------------------------
    def update(self, next_obs: np.ndarray, env_steps: int) -> dict[str, float]:
        c, b, net = self.config, self.buffer, self.net
        frac = 1.0 - self.updates / self.total_updates
        lr = self.learner.schedule(frac)
        clip = c.clip_coef * frac if c.anneal_clip else c.clip_coef

        with torch.no_grad():
            next_value = net.value(self._obs(next_obs))
            advantages = gae(b.rewards, b.values, next_value, b.terminated, b.done, c.gamma, c.gae_lambda)
            returns = advantages + b.values
        obs, actions, old_logprobs, old_values, advantages, returns = b.valid_samples(
            b.obs, b.actions, b.logprobs, b.values, advantages, returns
        )
        n = len(obs)
        size = max(1, -(-n // c.num_minibatches))
        stats = torch.zeros(5, device=self.device)  # pg loss, v loss, entropy, kl, clipfrac
        count = 0
        for _ in range(c.update_epochs):
            # A single minibatch is the whole rollout, whose gradient does not depend on order.
            minibatches = torch.randperm(n, device=self.device).split(size) if size < n else [slice(None)]
            for idx in minibatches:
                logprob, entropy, value = net.evaluate(obs[idx], actions[idx])
                log_ratio = logprob - old_logprobs[idx]
                ratio = log_ratio.exp()
                adv = advantages[idx]
                if c.norm_adv and len(adv) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)

                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                if c.clip_vloss:
                    clipped = old_values[idx] + (value - old_values[idx]).clamp(-clip, clip)
                    v_loss = (
                        0.5 * torch.max((value - returns[idx]) ** 2, (clipped - returns[idx]) ** 2).mean()
                    )
                else:
                    v_loss = 0.5 * ((value - returns[idx]) ** 2).mean()
                ent = entropy.mean()
                loss = pg_loss - c.ent_coef * ent + c.vf_coef * v_loss

                self.learner.step("optimizer", loss, samples=len(adv))

                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()  # Schulman's low-variance estimator
                    clipfrac = ((ratio - 1).abs() > clip).float().mean()
                    stats += torch.stack([pg_loss, v_loss, ent, approx_kl, clipfrac])
                count += 1
            if c.target_kl is not None and self.strategy.mean(approx_kl.item()) > c.target_kl:
                break
        self.updates += 1
        b.clear()
        pg, vl, ent, kl, cf = (stats / max(count, 1)).tolist()
        var = returns.var()
        explained = float(1 - (returns - old_values).var() / var) if var > 0 else float("nan")
        return {
            "policy_loss": pg,
            "value_loss": vl,
            "entropy": ent,
            "approx_kl": kl,
            "clip_fraction": cf,
            "explained_variance": explained,
            "learning_rate": lr,
        }


# Tuned defaults per env (RL-Baselines3-Zoo's, which shoal's tests and benchmarks check).
PRESETS: dict[str, dict] = {
    # The presets were tuned and measured without normalisation: they keep it off.
    "CartPole-v1": dict(
        num_envs=8,
        num_steps=32,
        num_minibatches=1,
        update_epochs=20,
        gae_lambda=0.8,
        gamma=0.98,
        ent_coef=0.0,
        learning_rate=1e-3,
        anneal_clip=True,
        clip_vloss=False,  # with an annealed clip range, a clipped value loss stops learning late
        total_steps=100_000,
        normalize_obs=False,
        normalize_reward=False,
    ),
    "Acrobot-v1": dict(
        num_envs=16,
        num_steps=256,
        num_minibatches=4,
        learning_rate=2.5e-4,
        gae_lambda=0.94,
        gamma=0.99,
        update_epochs=4,
        ent_coef=0.0,
        total_steps=200_000,
        normalize_obs=False,
        normalize_reward=False,
    ),
    "Pendulum-v1": dict(
        num_envs=4,
        num_steps=1024,
        gae_lambda=0.95,
        gamma=0.9,
        update_epochs=10,
        ent_coef=0.0,
        learning_rate=1e-3,
        num_minibatches=64,
        clip_coef=0.2,
        log_std_init=-0.7,
        total_steps=200_000,
        normalize_obs=False,
        normalize_reward=False,
    ),
    # Every Atari game (with shoal's Atari preprocessing, docs/atari.md): CleanRL's ppo_atari.py.
    "ALE/*": dict(
        num_envs=8,
        num_steps=128,
        learning_rate=2.5e-4,
        anneal_lr=True,
        update_epochs=4,
        num_minibatches=4,
        clip_coef=0.1,
        clip_vloss=True,
        norm_adv=True,
        ent_coef=0.01,
        vf_coef=0.5,
        gamma=0.99,
        gae_lambda=0.95,
        max_grad_norm=0.5,
        total_steps=10_000_000,
    ),
}
PRESETS["*NoFrameskip-v4"] = PRESETS["ALE/*"]  # the v4 ids shoal preprocesses too
PPO.presets = PRESETS

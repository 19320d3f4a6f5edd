"""Soft Actor-Critic (Haarnoja et al., 2018, "SAC: Algorithms and Applications", the v2 version).

Read top to bottom: a tanh-squashed Gaussian policy acts (uniformly random actions for the
first ``learning_starts`` env steps); transitions go to a replay buffer; every
``train_freq`` env steps, ``gradient_steps`` minibatch updates, each in SB3's order:

1. sample a ~ pi(.|s) with its log-probability (reused by steps 2 and 4);
2. temperature: minimise -log(alpha) (log pi(a|s) + target_entropy), target -|A|;
3. twin critics: regress Q_1, Q_2 (one batched network) onto the soft target
   r + gamma (min_i Q'_i(s', a') - alpha log pi(a'|s')), a' ~ pi(.|s'), Q' the targets;
4. actor: minimise alpha log pi(a|s) - min_i Q_i(s, a) through the updated critics;
5. targets: Q' <- (1 - tau) Q' + tau Q.

Three optimizers (actor, critic, temperature), each stepped through the learner, so the
strategy reduces, averages or pushes each one. Distributed: with ``param-avg`` the actor,
critics, log(alpha) and the target critics are averaged every K optimizer steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoal.algos.base import fused_ok
from shoal.algos.offpolicy import OffPolicyAlgorithm, OffPolicyConfig
from shoal.config import opt
from shoal.nn import SquashedGaussianActor, TwinQ


@dataclass
class SACConfig(OffPolicyConfig):
    """SAC's hyperparameters (SB3's defaults); replay and schedule settings are shared with TD3."""

    ent_coef: float | None = opt(None, "entropy coefficient alpha (None: tuned toward target_entropy)", gt=0)
    ent_coef_init: float = opt(1.0, "initial alpha when it is tuned", gt=0)
    target_entropy: float | None = opt(None, "entropy alpha is tuned toward (None: -action dimensions)")
    target_update_interval: int = opt(1, "gradient steps between target network updates", ge=1)


class Temperature(nn.Module):
    """log(alpha), a module so that checkpoints and strategies see it like any weights."""

    def __init__(self, alpha: float, learned: bool) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha)), requires_grad=learned)


class SAC(OffPolicyAlgorithm):
    name = "sac"
    config_class = SACConfig

    def __init__(self, config: SACConfig, obs_space, action_space, device, strategy=None) -> None:
        super().__init__(config, obs_space, action_space, device, strategy)
        c = config
        self.actor = SquashedGaussianActor(self.obs_size, self.act_size, c.hidden).to(device)
        self.critic = TwinQ(self.obs_size, self.act_size, c.hidden).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        learned = c.ent_coef is None
        self.temperature = Temperature(c.ent_coef_init if learned else c.ent_coef, learned).to(device)
        self.target_entropy = float(-self.act_size if c.target_entropy is None else c.target_entropy)

        def adam(module: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.Adam(module.parameters(), lr=c.learning_rate, fused=fused_ok(device))

        for name, module in [("actor", self.actor), ("critic", self.critic)] + (
            [("temperature", self.temperature)] if learned else []
        ):
            self.learner.add(name, module.parameters(), adam(module), anneal=c.anneal_lr)
        self.online, self.targets = list(self.critic.parameters()), list(self.critic_target.parameters())
        self.gradient_steps = 0  # taken, over the run (for target_update_interval)

    def policy_actions(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor(obs)[0]

    def predict(self, obs, deterministic: bool = True):  # noqa: ANN001, ANN201
        with torch.inference_mode():
            actions = self.actor(self._obs(obs), deterministic)[0].cpu().numpy()
        return self.to_bounds(actions)

    # -- learning -------------------------------------------------------------------------
    def update(self, next_obs, env_steps: int) -> dict[str, float]:  # noqa: ANN001
        c = self.config
        steps = self.gradient_steps_due(env_steps)
        lr = self.learner.schedule(1.0 - env_steps / c.total_steps)
        log_alpha = self.temperature.log_alpha
        stats = []
        for _ in range(steps):
            obs, actions, rewards, next_o, discounts = self.sample()
            n = len(rewards)

            # 1-2. the policy's actions now; the temperature, toward the target entropy
            pi, logp = self.actor(obs)
            alpha = log_alpha.detach().exp()  # this step's losses use alpha before its update
            alpha_loss = -(log_alpha * (logp.detach() + self.target_entropy)).mean()
            if log_alpha.requires_grad:
                self.learner.step("temperature", alpha_loss, samples=n)

            # 3. twin critics, toward the soft target of the target critics
            with torch.no_grad():
                next_a, next_logp = self.actor(next_o)
                next_q = self.critic_target(next_o, next_a).min(0).values - alpha * next_logp
                target = rewards + discounts * next_q
            q = self.critic(obs, actions)  # (2, batch), both critics in one call
            critic_loss = 0.5 * ((q - target) ** 2).mean(1).sum()
            self.learner.step("critic", critic_loss, samples=n)

            # 4. actor, through the updated critics; their weights get no gradient here
            self.critic.requires_grad_(False)
            actor_loss = (alpha * logp - self.critic(obs, pi).min(0).values).mean()
            self.learner.step("actor", actor_loss, samples=n)
            self.critic.requires_grad_(True)

            # 5. target critics
            self.gradient_steps += 1
            if self.gradient_steps % c.target_update_interval == 0:
                self.polyak(self.targets, self.online, c.tau)
            with torch.no_grad():
                stats.append(
                    torch.stack([critic_loss, actor_loss, alpha_loss, alpha, -logp.mean(), q.mean()])
                )
        self.updates += 1
        critic_l, actor_l, alpha_l, alpha_v, entropy, q_mean = torch.stack(stats).mean(0).tolist()
        return {
            "critic_loss": critic_l,
            "actor_loss": actor_l,
            "alpha_loss": alpha_l,
            "alpha": alpha_v,
            "entropy": entropy,  # an estimate: -mean log pi of the sampled actions
            "q_mean": q_mean,
            "learning_rate": lr,
        }

    # -- state ----------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {
            "actor": self.actor,
            "critic": self.critic,
            "critic_target": self.critic_target,
            "temperature": self.temperature,
        }

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "gradient_steps": self.gradient_steps}


PRESETS: dict[str, dict[str, Any]] = {
    # RL-Baselines3-Zoo's Pendulum values (lr 1e-3, the rest SB3's defaults), with 1k
    # warm-up steps and (64, 64) networks: Pendulum needs no more, and 15k steps then
    # take well under a minute on one core.
    "Pendulum-v1": dict(
        learning_rate=1e-3,
        learning_starts=1_000,
        hidden=(64, 64),
        torch_threads=1,  # 64x64 networks: one thread is fastest
        total_steps=15_000,
    ),
}
SAC.presets = PRESETS

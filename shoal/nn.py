"""Networks: MLP or Nature-DQN CNN encoders, actor-critic heads and Q-networks.

Log-probabilities and entropies are written out by hand instead of going through
``torch.distributions``: for the small networks RL uses, the distribution objects' checks
and bookkeeping cost more than the math.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Module:
    """Orthogonal weights, constant bias: the initialisation PPO implementations rely on."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def is_image(space: spaces.Space) -> bool:
    """uint8 observations with 3 dimensions are frames (HxWxC or CxHxW)."""
    return isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


class NatureCNN(nn.Module):
    """The Nature-DQN encoder; uint8 frames are scaled to [0, 1] inside the network."""

    def __init__(self, space: spaces.Box, features: int = 512) -> None:
        super().__init__()
        shape = space.shape
        self.channels_last = shape[-1] < shape[0]  # HxWxC frames come channel-last
        channels = shape[-1] if self.channels_last else shape[0]
        self.conv = nn.Sequential(
            layer_init(nn.Conv2d(channels, 32, 8, stride=4)),
            nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)),
            nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n = self.conv(self._prepare(torch.zeros((1, *shape)))).shape[1]
        self.head = nn.Sequential(layer_init(nn.Linear(n, features)), nn.ReLU())
        self.out_features = features

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        return x.permute(0, 3, 1, 2) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self._prepare(x)))


def mlp(inputs: int, hidden: tuple[int, ...], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Fully connected layers, each followed by ``activation``."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [layer_init(nn.Linear(inputs, width)), activation()]
        inputs = width
    return nn.Sequential(*layers)


def encoder(space: spaces.Space, hidden: tuple[int, ...], activation: type[nn.Module]) -> nn.Module:
    """CNN for frames, flatten + MLP for anything else."""
    if is_image(space):
        return NatureCNN(space)
    size = int(np.prod(space.shape)) if space.shape else 1
    body = mlp(size, hidden, activation)
    body.out_features = hidden[-1] if hidden else size
    return nn.Sequential(nn.Flatten(), body) if len(space.shape or ()) > 1 else body


def _out(module: nn.Module) -> int:
    return module.out_features if hasattr(module, "out_features") else module[-1].out_features


class ActorCritic(nn.Module):
    """Separate actor and critic networks; categorical or diagonal-Gaussian policy.

    The Gaussian has a state-independent log-std (a learned vector), as in PPO's paper.
    """

    def __init__(
        self,
        obs_space: spaces.Space,
        action_space: spaces.Space,
        hidden: tuple[int, ...] = (64, 64),
        activation: type[nn.Module] = nn.Tanh,
        log_std_init: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(action_space, spaces.Discrete):
            self.discrete, n_out = True, int(action_space.n)
        elif isinstance(action_space, spaces.Box):
            self.discrete, n_out = False, int(np.prod(action_space.shape))
            self.log_std = nn.Parameter(torch.full((n_out,), float(log_std_init)))
        else:
            raise ValueError(f"actor-critic supports Discrete and Box actions, not {action_space}")
        self.actor_body = encoder(obs_space, hidden, activation)
        self.critic_body = encoder(obs_space, hidden, activation)
        self.actor_head = layer_init(nn.Linear(_out(self.actor_body), n_out), std=0.01)
        self.critic_head = layer_init(nn.Linear(_out(self.critic_body), 1), std=1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic_head(self.critic_body(obs)).squeeze(-1)

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits (discrete) or the Gaussian mean (continuous)."""
        return self.actor_head(self.actor_body(obs))

    def sample(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions and their log-probabilities."""
        out = self.policy(obs)
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            action = out.argmax(-1) if deterministic else torch.multinomial(logp_all.exp(), 1).squeeze(-1)
            return action, logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        std = self.log_std.exp()
        action = out if deterministic else out + std * torch.randn_like(out)
        return action, gaussian_log_prob(action, out, self.log_std)

    def evaluate(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Log-probability of ``action``, policy entropy and value: what the losses need."""
        out = self.policy(obs)
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            logp = logp_all.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        else:
            logp = gaussian_log_prob(action, out, self.log_std)
            entropy = (0.5 + 0.5 * LOG_2PI + self.log_std).sum().expand(out.shape[0])
        return logp, entropy, self.value(obs)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Log-density of a diagonal Gaussian, summed over action dimensions."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)


class QNetwork(nn.Module):
    """Q-values of every discrete action."""

    def __init__(
        self, obs_space: spaces.Space, action_space: spaces.Discrete, hidden: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.body = encoder(obs_space, hidden, nn.ReLU)
        self.head = nn.Linear(_out(self.body), int(action_space.n))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(obs))

"""Networks: MLP or Nature-DQN CNN encoders, actor-critic heads and Q-networks.

Log-probabilities and entropies are written out by hand instead of going through
``torch.distributions``: for the small networks RL uses, the distribution objects' checks
and bookkeeping cost more than the math.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def layer_init(
    layer: nn.Module, std: float = math.sqrt(2), bias: float = 0.0, ortho: bool = True
) -> nn.Module:
    """Orthogonal weights, constant bias: the initialisation PPO implementations rely on
    (``ortho`` False: PyTorch's default, kept as the layer was made)."""
    if ortho:
        nn.init.orthogonal_(layer.weight, std)
        nn.init.constant_(layer.bias, bias)
    return layer


ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


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
        x = x.permute(0, 3, 1, 2) if self.channels_last else x
        # On CPU, oneDNN's convolutions run 1.2-1.5x faster (forward and backward, Nature CNN,
        # batch 256) on channels-last activations: stacked CxHxW frames are laid out so here.
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

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


class TwinMLP(nn.Module):
    """Two MLPs of the same shape (actor and critic bodies) run as one batched matmul per layer.

    For the small networks RL uses, the cost of a layer is the per-op overhead, not the
    arithmetic: stacking the two bodies halves the ops of every forward and backward pass.
    The math is exactly that of two separate MLPs, each initialised orthogonally.
    """

    def __init__(
        self, inputs: int, hidden: tuple[int, ...], activation: type[nn.Module], ortho: bool = True
    ) -> None:
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for width in hidden:
            w, b = torch.empty(2, inputs, width), torch.zeros(2, 1, width)
            for k in range(2):  # each body's (out x in) matrix, initialised as an nn.Linear's
                if ortho:
                    nn.init.orthogonal_(w[k].T, math.sqrt(2))
                else:  # nn.Linear's default: uniform within 1/sqrt(fan_in), bias too
                    bound = 1 / math.sqrt(inputs)
                    nn.init.uniform_(w[k], -bound, bound)
                    nn.init.uniform_(b[k], -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
            inputs = width
        self.activation = activation()
        self.out_features = inputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.unsqueeze(0).expand(2, *x.shape)
        for w, b in zip(self.weights, self.biases):
            h = self.activation(torch.baddbmm(b, h, w))
        return h[0], h[1]


class ActorCritic(nn.Module):
    """Categorical or diagonal-Gaussian policy and a state value.

    Vector observations use a :class:`TwinMLP`: separate actor and critic bodies, as SB3's
    MlpPolicy. Frames use one Nature-CNN that both heads share, as the Atari setups of PPO's
    paper, CleanRL and SB3's CnnPolicy do: the convolutions are nearly all of the compute, and
    a second one would double it. The Gaussian has a state-independent log-std (a learned
    vector), as in PPO's paper.
    """

    def __init__(
        self,
        obs_space: spaces.Space,
        action_space: spaces.Space,
        hidden: tuple[int, ...] = (64, 64),
        activation: type[nn.Module] = nn.Tanh,
        log_std_init: float = 0.0,
        ortho_init: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(action_space, spaces.Discrete):
            self.discrete, n_out = True, int(action_space.n)
        elif isinstance(action_space, spaces.Box):
            self.discrete, n_out = False, int(np.prod(action_space.shape))
            self.log_std = nn.Parameter(torch.full((n_out,), float(log_std_init)))
        else:
            raise ValueError(f"actor-critic supports Discrete and Box actions, not {action_space}")
        if is_image(obs_space):
            self.body = NatureCNN(obs_space)
            self.twin = None
            features = self.body.out_features
        else:
            inputs = int(np.prod(obs_space.shape)) if obs_space.shape else 1
            self.twin = TwinMLP(inputs, hidden, activation, ortho_init)
            features = self.twin.out_features
        self.actor_head = layer_init(nn.Linear(features, n_out), std=0.01, ortho=ortho_init)
        self.critic_head = layer_init(nn.Linear(features, 1), std=1.0, ortho=ortho_init)

    def heads(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy output (logits or Gaussian mean) and state value, in one pass."""
        if self.twin is not None:
            h_actor, h_critic = self.twin(obs.reshape(obs.shape[0], -1).float())
        else:
            h_actor = h_critic = self.body(obs)
        return self.actor_head(h_actor), self.critic_head(h_critic).squeeze(-1)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.heads(obs)[1]

    def policy(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits (discrete) or the Gaussian mean (continuous)."""
        return self.heads(obs)[0]

    def sample_from(
        self, out: torch.Tensor, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions drawn from policy output ``out``, and their log-probabilities."""
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            action = out.argmax(-1) if deterministic else torch.multinomial(logp_all.exp(), 1).squeeze(-1)
            return action, logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
        std = self.log_std.exp()
        action = out if deterministic else out + std * torch.randn_like(out)
        return action, gaussian_log_prob(action, out, self.log_std)

    def sample(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions and their log-probabilities."""
        return self.sample_from(self.policy(obs), deterministic)

    def evaluate(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Log-probability of ``action``, policy entropy and value: what the losses need."""
        out, value = self.heads(obs)
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            logp = logp_all.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        else:
            logp = gaussian_log_prob(action, out, self.log_std)
            entropy = (0.5 + 0.5 * LOG_2PI + self.log_std).sum().expand(out.shape[0])
        return logp, entropy, value


def clip_grad_norm(parameters: Any, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2), without its per-call bookkeeping.

    Same math: scale all gradients by ``min(1, max_norm / (total_norm + 1e-6))``; for small
    networks torch's version spends ~150 us per call grouping tensors, this one ~20 us.
    A non-finite norm leaves the gradients as they are (instead of spreading the NaN to all
    of them), so the check in ``Strategy.step`` can name the parameter it came from.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    finite_total = torch.nan_to_num(total, nan=0.0, posinf=0.0)  # non-finite: scale 1
    torch._foreach_mul_(grads, torch.clamp(max_norm / (finite_total + 1e-6), max=1.0))
    return total


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


# -- off-policy continuous control (SAC, TD3) -------------------------------------------------
LOG_2 = math.log(2.0)


def relu_mlp(inputs: int, hidden: tuple[int, ...], outputs: int) -> nn.Sequential:
    """ReLU layers with torch's default (uniform) initialisation, as SB3's SAC and TD3 use."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        inputs = width
    return nn.Sequential(*layers, nn.Linear(inputs, outputs))


def flat_size(space: spaces.Space) -> int:
    return int(np.prod(space.shape)) if space.shape else 1


class TwinQ(nn.Module):
    """Two Q(s, a) MLPs run as one: each layer is one batched matmul over stacked weights.

    ``forward`` returns both critics' values, shape (2, batch), in one call: for the small
    networks of continuous control a layer costs its per-op overhead more than its
    arithmetic, so the twin costs about what one critic does. Each critic is initialised
    like ``nn.Linear`` (uniform in +-1/sqrt(fan_in)), exactly as two separate MLPs would be.
    """

    def __init__(self, obs_size: int, act_size: int, hidden: tuple[int, ...], critics: int = 2) -> None:
        super().__init__()
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        inputs = obs_size + act_size
        for width in (*hidden, 1):
            bound = 1.0 / math.sqrt(inputs)
            self.weights.append(nn.Parameter(torch.empty(critics, inputs, width).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(critics, 1, width).uniform_(-bound, bound)))
            inputs = width

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Q-values (critics x batch); ``first_only``: Q1 alone (TD3's actor loss), shape (1, batch)."""
        x = torch.cat([obs.reshape(obs.shape[0], -1).float(), actions], -1)
        k = 1 if first_only else self.weights[0].shape[0]
        h = x.unsqueeze(0).expand(k, *x.shape)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b[:k], h, w[:k])
            if i < last:
                h = torch.relu(h)
        return h.squeeze(-1)


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # SAC's clamp of the policy's log-std


def squashed_gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``a = tanh(u)``, ``u ~ N(mean, exp(log_std))``, summed over dimensions.

    Change of variables: log p(a) = log N(u) - sum log(1 - tanh(u)^2), with
    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and stable for large |u|
    (SAC's paper, appendix C, adds an epsilon inside the log instead).
    """
    return gaussian_log_prob(u, mean, log_std) - (2.0 * (LOG_2 - u - nn.functional.softplus(-2.0 * u))).sum(
        -1
    )


class SquashedGaussianActor(nn.Module):
    """SAC's policy: a Gaussian with state-dependent mean and log-std, squashed by tanh into [-1, 1]."""

    def __init__(self, obs_size: int, act_size: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.net = relu_mlp(obs_size, hidden, 2 * act_size)  # mean and log-std from one layer

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions in [-1, 1] and their log-probabilities (``deterministic``: tanh of the mean)."""
        mean, log_std = self.net(obs.reshape(obs.shape[0], -1).float()).chunk(2, -1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        return torch.tanh(u), squashed_gaussian_log_prob(u, mean, log_std)


class DeterministicActor(nn.Module):
    """TD3's policy: an MLP whose tanh output is the action in [-1, 1]."""

    def __init__(self, obs_size: int, act_size: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.net = relu_mlp(obs_size, hidden, act_size)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs.reshape(obs.shape[0], -1).float()))

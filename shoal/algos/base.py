"""What the shared training loop needs from an algorithm, and nothing more.

The loop (``shoal.training.trainer``) steps the vector env and, each step, calls ``act`` then
``record``; when ``ready()`` it calls ``update``. Everything else of an algorithm (its
networks, buffers and losses) lives in its own module and reads top to bottom there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from shoal.algos.vtrace import vtrace
from shoal.buffers import RolloutBuffer
from shoal.config import TrainConfig
from shoal.distributed.strategy import LocalStrategy, Strategy
from shoal.nn import ACTIVATIONS, ActorCritic
from shoal.normalize import EPS, Normalizer
from shoal.training.learner import Learner


def fused_ok(device: torch.device) -> bool:
    """Whether the optimizer can use its fused kernel (one call instead of several per tensor)."""
    return device.type in ("cpu", "cuda")


class Algorithm:
    """Base class: holds the config, spaces, device and strategy of one learner."""

    name = "algorithm"
    config_class: type[TrainConfig] = TrainConfig
    presets: dict[str, dict[str, Any]] = {}

    def __init__(
        self,
        config: TrainConfig,
        obs_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device,
        strategy: Strategy | None = None,
    ) -> None:
        self.config = config
        self.obs_space, self.action_space = obs_space, action_space
        self.device = device
        self.strategy = strategy or LocalStrategy()
        self.learner = Learner(self.strategy)  # takes every optimizer step (see shoal.training.learner)
        self.updates = 0
        # Observation and reward statistics are part of the agent: saved, restored, applied
        # by predict. Their data is merged across workers by the strategy (see merge_statistics).
        self.normalizer = Normalizer(
            obs_space.shape or (),
            config.num_envs,
            obs=bool(config.normalize_obs),
            reward=bool(config.normalize_reward),
            gamma=float(getattr(config, "gamma", 0.99)),
            obs_clip=config.obs_clip,
            reward_clip=config.reward_clip,
        )
        self._obs_stats: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # -- the loop's interface --------------------------------------------------------------
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions to send to the envs for a batch of observations (exploring)."""
        raise NotImplementedError

    def record(
        self,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        next_obs: np.ndarray,
        valid: np.ndarray,
        env_steps: int,
    ) -> None:
        """Store the step that followed the last ``act``."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether ``update`` should run now."""
        raise NotImplementedError

    def update(self, next_obs: np.ndarray, env_steps: int) -> dict[str, float]:
        """Learn from the stored experience; return metrics to log."""
        raise NotImplementedError

    def predict(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Actions for evaluation or deployment (greedy by default)."""
        raise NotImplementedError

    def observe(self, obs: np.ndarray, rewards: np.ndarray, ended: np.ndarray, valid: np.ndarray) -> None:
        """Count one vector step in the normalisation statistics (``obs``: what was acted on).

        Called by the loop before ``record``; what is counted is used only after the next merge.
        """
        self.normalizer.observe(obs)
        self.normalizer.track(rewards, ended, valid)

    def merge_statistics(self) -> None:
        """After an update: the strategy merges the workers' new statistics (or defers it)."""
        if self.normalizer.active:
            self.strategy.merge_statistics(self.normalizer)

    def on_new_episodes(self) -> None:
        """The loop is about to reset every env (a checkpoint boundary)."""

    def cut_episodes(self, envs: np.ndarray) -> None:
        """The episodes of ``envs`` (a bool mask) end early: their env failed and was restarted,
        or returned a NaN/inf that ``--nan-policy skip`` keeps out of training.

        Called before ``record`` of the step that brought the new env's first observation.
        """

    # -- replay learners in a group -------------------------------------------------------
    # ``env_steps`` is the group's count. Workers averaged into one learner
    # (``Strategy.one_learner``: sync, param-avg, a synchronous server) train on that count,
    # as the one learner would, each on its share of the batch and of the replay buffer:
    # their mean update is its update, at the same total budget. Workers whose every update
    # is applied (a3c, an asynchronous server) each train on their own steps (the group's
    # count grows world_size times as fast) with the whole batch, as a learner alone would.
    def replay_interval(self, steps: int) -> int:
        """``steps`` env steps of one learner's schedule (training, target updates), counted
        as the group counts them."""
        s = self.strategy
        return steps if s.one_learner else steps * s.world_size

    def replay_batch(self, batch_size: int) -> int:
        """This worker's share of a learner's batch."""
        s = self.strategy
        return max(1, batch_size // s.world_size) if s.one_learner else batch_size

    def replay_capacity(self, buffer_size: int) -> int:
        """This worker's share of a learner's replay buffer: between them, workers that are one
        learner keep its ``buffer_size`` most recent transitions (of the group's steps), as it
        would; each of the others keeps a whole buffer of its own steps."""
        s = self.strategy
        return -(-buffer_size // s.world_size) if s.one_learner else buffer_size

    def training_phases(self, since: int, train_freq: int) -> int:
        """Training phases due now, ``since`` env steps (the group's count) after the last.

        A learner takes at most one per vector step (``ready`` said it is due), so a learner
        alone, or a worker learning on its own steps, takes 1. Workers that are one learner
        stand for world_size of its vector steps at each of theirs: as many phases as it
        would take in them (its first phase after ``learning_starts`` aside, which may come
        with up to world_size - 1 more)."""
        s = self.strategy
        if not s.one_learner or s.world_size == 1:
            return 1
        return min(s.world_size, max(1, since // max(train_freq, self.config.num_envs)))

    def gradient_steps_due(self, env_steps: int) -> int:
        """A replay learner's gradient steps in this training phase, which starts now (its
        config's ``gradient_steps`` per phase, its ``last_train``: when the last began)."""
        c = self.config
        phases = self.training_phases(env_steps - self.last_train, c.train_freq)
        self.last_train = env_steps
        return phases * c.gradient_steps

    # -- state, for checkpoints -----------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        """Networks to save (their weights are all an agent needs to act)."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer, as registered with the learner."""
        return self.learner.optimizers()

    def extra_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-able values beyond weights and optimizers (buffers, RNGs)."""
        return {}, {}

    def load_extra_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        pass

    def statistics_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The normalisation statistics, for checkpoints (arrays + JSON)."""
        return self.normalizer.state()

    def load_statistics(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        # Unmerged data is the saver's (the chief's): another worker would count it twice.
        self.normalizer.load(arrays, meta, fresh=self.strategy.rank == 0)

    def _to_env(self, actions: torch.Tensor) -> np.ndarray:
        """Network actions as the env takes them: Box actions clipped to the bounds."""
        out = actions.cpu().numpy()
        if isinstance(self.action_space, spaces.Box):
            out = np.clip(
                out.reshape((-1, *self.action_space.shape)), self.action_space.low, self.action_space.high
            ).astype(self.action_space.dtype)
        return out

    def _obs(self, obs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Observations (raw, from the envs or a replay buffer) as the networks take them:
        normalised with the statistics in use, when ``normalize_obs`` is on."""
        x = torch.as_tensor(obs, device=self.device)
        n = self.normalizer
        if not n.on_obs:
            return x
        if self._obs_stats is None or self._obs_stats[0] != n.version:
            stats = n.used[0]
            mean = torch.as_tensor(stats.mean, dtype=torch.float32, device=self.device)
            std = torch.as_tensor(np.sqrt(stats.var + EPS), dtype=torch.float32, device=self.device)
            self._obs_stats = (n.version, mean, std)
        _, mean, std = self._obs_stats
        return ((x.float() - mean) / std).clamp_(-n.obs_clip, n.obs_clip)

    def _rewards(self, rewards: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Rewards (or discounted sums of them) as the algorithm learns from them: divided by
        the return's running std when ``normalize_reward`` is on. Logged returns stay raw."""
        return self.normalizer.scale(rewards)


def actor_critic(config: Any, obs_space: spaces.Space, action_space: spaces.Space) -> ActorCritic:
    """The :class:`ActorCritic` a config describes (``hidden``, ``activation``, ``ortho_init``,
    ``log_std_init``): the same network for a seed wherever it is made."""
    return ActorCritic(
        obs_space,
        action_space,
        config.hidden,
        ACTIVATIONS[config.activation],
        config.log_std_init,
        ortho_init=config.ortho_init,
    )


class OneActorCritic(Algorithm):
    """An algorithm whose one :class:`ActorCritic` (``self.net``) acts and is all it saves."""

    net: ActorCritic

    def predict(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        with torch.inference_mode():
            action, _ = self.net.sample(self._obs(obs), deterministic)
        return self._to_env(action)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"net": self.net}


class ActorCriticAlgorithm(OneActorCritic):
    """Acting and rollout storage shared by PPO and A2C; each defines only its update.

    Its config needs ``num_steps``, ``hidden`` and ``log_std_init`` besides the common fields.
    """

    def __init__(
        self,
        config: Any,
        obs_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device,
        strategy: Strategy | None = None,
    ) -> None:
        super().__init__(config, obs_space, action_space, device, strategy)
        c = config
        self.net = actor_critic(c, obs_space, action_space).to(device)
        discrete = isinstance(action_space, spaces.Discrete)
        self.buffer = RolloutBuffer(
            c.num_steps,
            c.num_envs,
            obs_space.shape,
            torch.as_tensor(obs_space.sample()).dtype,
            () if discrete else action_space.shape,
            torch.long if discrete else torch.float32,
            device,
        )
        per_update = c.num_steps * c.num_envs * self.strategy.world_size  # env steps of all workers
        self.total_updates = max(1, c.total_steps // per_update)

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs_t = self._obs(obs)  # stored as the network saw it: normalised with this rollout's statistics
        with torch.inference_mode():
            out, value = self.net.heads(obs_t)
            action, logprob = self.net.sample_from(out)
        self._last = (obs_t, action, logprob, value)
        return self._to_env(action)

    def record(self, rewards, terminated, truncated, next_obs, valid, env_steps) -> None:  # noqa: ANN001
        self.buffer.add(*self._last, self._rewards(rewards), terminated, truncated, valid)

    def ready(self) -> bool:
        return self.buffer.full

    def cut_episodes(self, envs: np.ndarray) -> None:
        # The last stored step becomes a truncation: its bootstrap is the value of the last
        # observation the lost env returned, which is the next stored step's value.
        self.buffer.truncate(envs)


@dataclass
class Trajectories:
    """A learner batch of fixed-length trajectories, time-major: ``T`` steps of ``M`` envs
    (the trajectories' envs side by side), on the learner's device.

    ``obs`` holds the raw observations, with one more step (``obs[T]``, the observation after
    the last step, to bootstrap from); ``behaviour_logprobs`` are log mu(a|x) of the policy
    that acted (some updates older than the learner's); ``valid`` is False on the autoreset
    step after an episode end, which is not to be learned from.
    """

    obs: torch.Tensor  # (T + 1, M, *obs_shape)
    actions: torch.Tensor  # (T, M, *action_shape)
    behaviour_logprobs: torch.Tensor  # (T, M)
    rewards: torch.Tensor  # (T, M)
    terminated: torch.Tensor  # (T, M) float 0/1
    truncated: torch.Tensor  # (T, M) float 0/1
    valid: torch.Tensor  # (T, M) bool

    @property
    def done(self) -> torch.Tensor:
        return torch.maximum(self.terminated, self.truncated)


class TrajectoryAlgorithm(OneActorCritic):
    """An actor-critic that learns from trajectories other processes acted (IMPALA, APPO).

    The learner loop (:mod:`shoal.training.decoupled`) hands it :class:`Trajectories` in
    ``learn``; the actors act with :meth:`actor_network`, loaded from the learner's weights.
    Neither knows where the other runs. Its config needs ``hidden`` and ``log_std_init``.
    """

    decoupled = True  # trained by the decoupled learner loop, not the step-by-step one

    def __init__(
        self,
        config: Any,
        obs_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device,
        strategy: Strategy | None = None,
    ) -> None:
        super().__init__(config, obs_space, action_space, device, strategy)
        self.net = self.actor_network(config, obs_space, action_space).to(device)

    @classmethod
    def actor_network(cls, config: Any, obs_space: spaces.Space, action_space: spaces.Space) -> ActorCritic:
        """The network actors act with and the learner trains (same initial weights for a seed)."""
        return actor_critic(config, obs_space, action_space)

    def learn(self, batch: Trajectories, env_steps: int) -> dict[str, float]:
        """One update on ``batch``; ``env_steps`` sampled so far (for schedules); metrics to log."""
        raise NotImplementedError

    def vtrace_targets(
        self,
        batch: Trajectories,
        rho_bar: float,
        c_bar: float,
        pg_rho_bar: float | None = None,
        lam: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values V(x_t), V-trace targets v_s, policy-gradient advantages), all (T, M) and without
        gradient, under the learner's current policy (the target policy pi)."""
        t = batch.rewards.shape[0]
        with torch.no_grad():
            flat_obs = self._obs(batch.obs.flatten(0, 1))
            flat_actions = batch.actions.flatten(0, 1)
            out, values = self.net.heads(flat_obs)
            values = values.view(t + 1, -1)
            logprobs, _, _ = self.net.evaluate(flat_obs[: len(flat_actions)], flat_actions)
        target = vtrace(
            batch.behaviour_logprobs,
            logprobs.view(t, -1),
            self._rewards(batch.rewards),
            values[:t],
            values[t],
            batch.terminated,
            batch.done,
            float(self.config.gamma),
            rho_bar=rho_bar,
            c_bar=c_bar,
            pg_rho_bar=pg_rho_bar,
            lam=lam,
        )
        return values[:t], target.vs, target.pg_advantages

    # the step-by-step loop's interface: not this algorithm's
    def act(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.name} learns from actor processes (shoal.training.decoupled)")

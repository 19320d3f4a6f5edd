"""Experience storage: a rollout buffer for on-policy methods, a replay buffer for DQN.

Vector envs reset with gymnasium's next-step autoreset: the step after an episode ends
returns the first observation of the next episode, with reward 0, and ignores the action.
Such steps are stored with ``valid=False`` and never trained on; the observation stored
right after a truncated step is its final observation, which is what a truncated
episode's value bootstrap needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_value: torch.Tensor,
    terminated: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """Generalised advantage estimates over a (T, N) rollout.

    ``values[t + 1]`` (or ``next_value`` at the end) is the value of the observation that
    step ``t`` returned: zero after a termination, a bootstrap after a truncation. The
    recursion stops at every episode end (``done``), so nothing leaks across episodes.
    """
    # A short sequential loop over (T, N) arrays: numpy's per-op cost is a fraction of torch's.
    r, v, term, d = (x.detach().cpu().numpy() for x in (rewards, values, terminated, done))
    following = np.concatenate([v[1:], next_value.detach().cpu().numpy()[None]], axis=0)
    deltas = r + gamma * following * (1.0 - term) - v
    carry = gamma * lam * (1.0 - d)
    advantages = np.zeros_like(r)
    last = np.zeros_like(r[0])
    for t in reversed(range(r.shape[0])):
        last = deltas[t] + carry[t] * last
        advantages[t] = last
    return torch.from_numpy(advantages).to(rewards.device)


class RolloutBuffer:
    """``steps`` x ``num_envs`` transitions, preallocated on the learner's device."""

    def __init__(
        self,
        steps: int,
        num_envs: int,
        obs_shape: tuple,
        obs_dtype: torch.dtype,
        action_shape: tuple,
        action_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros((steps, num_envs, *shape), dtype=dtype, device=device)

        self.steps, self.num_envs = steps, num_envs
        self.obs = zeros(*obs_shape, dtype=obs_dtype)
        self.actions = zeros(*action_shape, dtype=action_dtype)
        self.logprobs = zeros()
        self.values = zeros()
        # Per-step scalars arrive as numpy arrays: keep them in numpy (one cheap copy per
        # step) and hand them to torch once per update.
        self._rewards = np.zeros((steps, num_envs), dtype=np.float32)
        self._terminated = np.zeros((steps, num_envs), dtype=np.float32)
        self._done = np.zeros((steps, num_envs), dtype=np.float32)
        self._valid = np.zeros((steps, num_envs), dtype=bool)
        self.device = device
        self.t = 0

    @property
    def full(self) -> bool:
        return self.t == self.steps

    def clear(self) -> None:
        """Start the next rollout (the stored one has been learned from)."""
        self.t = 0

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    @property
    def rewards(self) -> torch.Tensor:
        return self._tensor(self._rewards)

    @property
    def terminated(self) -> torch.Tensor:
        return self._tensor(self._terminated)

    @property
    def done(self) -> torch.Tensor:
        return self._tensor(self._done)

    @property
    def valid(self) -> torch.Tensor:
        return self._tensor(self._valid)

    def valid_samples(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """``tensors`` (each T x N x ...) flattened to the real transitions only.

        Reset steps of next-step autoreset (``valid=False``) are dropped: their action was
        ignored by the env, so there is nothing to learn from them.
        """
        valid = self.valid.reshape(-1)
        return [x.reshape(-1, *x.shape[2:])[valid] for x in tensors]

    def add(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        logprobs: torch.Tensor,
        values: torch.Tensor,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        valid: np.ndarray,
    ) -> None:
        t = self.t
        self.obs[t] = obs
        self.actions[t] = actions
        self.logprobs[t] = logprobs
        self.values[t] = values
        self._rewards[t] = rewards
        self._terminated[t] = terminated
        self._done[t] = terminated | truncated
        self._valid[t] = valid
        self.t += 1

    def truncate(self, envs: np.ndarray) -> None:
        """End the episodes of ``envs`` at the last stored step (a truncation, bootstrapped).

        At ``t == 0`` that step was the end of the previous rollout, which the update
        already bootstrapped from the value of the observation it returned.
        """
        if self.t > 0:
            self._done[self.t - 1, envs] = 1.0


class ReplayBuffer:
    """A ring buffer of (obs, action, n-step return, next obs, discount) transitions.

    n-step returns are assembled per env as transitions arrive: a transition enters the
    ring once its ``n`` rewards are known, or earlier when its episode ends. ``discount``
    is ``gamma**k`` for a bootstrap ``k`` steps ahead, or 0 after a termination.
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        obs_shape: tuple,
        obs_dtype: np.dtype,
        action_shape: tuple,
        action_dtype: np.dtype,
        n_step: int,
        gamma: float,
    ) -> None:
        self.capacity, self.n_step, self.gamma = capacity, n_step, gamma
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros((capacity, *action_shape), dtype=action_dtype)
        self.returns = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.pos, self.size = 0, 0
        self.pending: list[list[tuple]] = [[] for _ in range(num_envs)]  # per env, oldest first

    def _store(self, obs: Any, action: Any, ret: float, next_obs: Any, discount: float) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.next_obs[i] = obs, action, next_obs
        self.returns[i], self.discounts[i] = ret, discount
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def add(
        self,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_obs: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        valid: np.ndarray,
    ) -> None:
        """One vector step; invalid (autoreset) steps are skipped."""
        for e in np.flatnonzero(valid):
            queue = self.pending[e]
            queue.append((obs[e], actions[e], float(rewards[e])))
            ended = bool(terminated[e] or truncated[e])
            while queue and (len(queue) == self.n_step or ended):
                ret = sum(r * self.gamma**k for k, (_, _, r) in enumerate(queue))
                discount = 0.0 if terminated[e] else self.gamma ** len(queue)
                first_obs, first_action, _ = queue.pop(0)
                self._store(first_obs, first_action, ret, next_obs[e], discount)

    def clear_pending(self, envs: np.ndarray | None = None) -> None:
        """Drop partial n-step transitions of ``envs`` (default: all): their episodes are cut short."""
        for e, queue in enumerate(self.pending):
            if envs is None or envs[e]:
                queue.clear()

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        idx = rng.integers(0, self.size, batch)
        return self.obs[idx], self.actions[idx], self.returns[idx], self.next_obs[idx], self.discounts[idx]

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (for safetensors) and scalars (for JSON) of the whole buffer."""
        arrays = {
            k: getattr(self, k)[: self.size] for k in ("obs", "next_obs", "actions", "returns", "discounts")
        }
        return arrays, {"pos": self.pos, "size": self.size, "pending": [len(q) for q in self.pending]}

    def load(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if not arrays:  # a checkpoint for acting (the best one) holds no transitions: start empty
            return
        if any(meta["pending"]):
            raise ValueError("a replay buffer with partial n-step transitions cannot be restored")
        for key, value in arrays.items():
            getattr(self, key)[: len(value)] = value
        self.pos, self.size = int(meta["pos"]), int(meta["size"])

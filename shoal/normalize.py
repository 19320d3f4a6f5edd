"""Running statistics that make observations and rewards the same size on every env.

Observations: ``(obs - mean) / sqrt(var + eps)``, clipped to ``+-obs_clip``. Rewards: divided
by the running standard deviation of the discounted return (per env: ``ret = gamma * ret +
r``, zeroed at episode ends), clipped to ``+-reward_clip``, as SB3's ``VecNormalize`` and
CleanRL's ``NormalizeReward`` do; the mean is not subtracted (that would change the task).

Statistics are counts, means and sums of squared deviations (M2), merged with Chan et al.'s
parallel update, exact whatever the order the data came in. A ``Normalizer`` keeps two
sets: ``used``, the statistics every observation is normalised with, and ``fresh``, the data
seen since the last merge. Between merges the normalisation stays fixed, so a rollout is
normalised one way throughout, and workers that merge their fresh data at the same points
(the strategy decides when, see ``Strategy.merge_statistics``) normalise identically.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-8


class RunningMeanStd:
    """Count, mean and M2 (sum of squared deviations) of everything seen, in float64."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        self.shape = tuple(shape)
        self.count = 0.0
        self.mean = np.zeros(self.shape, np.float64)
        self.m2 = np.zeros(self.shape, np.float64)

    @property
    def var(self) -> np.ndarray:
        return self.m2 / self.count if self.count > 0 else np.ones(self.shape, np.float64)

    def update(self, batch: np.ndarray) -> None:
        """Add a batch of samples (leading axis: samples)."""
        batch = np.asarray(batch, np.float64).reshape((-1, *self.shape))
        if len(batch):
            mean = batch.mean(0)
            self.merge(len(batch), mean, ((batch - mean) ** 2).sum(0))

    def merge(self, count: float, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al.: the statistics of the union of what both sets saw."""
        if count <= 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = np.asarray(self.mean + delta * (count / total))
        self.m2 = np.asarray(self.m2 + m2 + delta**2 * (self.count * count / total))
        self.count = total

    def absorb(self, other: RunningMeanStd) -> None:
        self.merge(other.count, other.mean, other.m2)

    def reset(self) -> None:
        self.count = 0.0
        self.mean = np.zeros(self.shape, np.float64)
        self.m2 = np.zeros(self.shape, np.float64)

    # -- as one flat float64 vector (the wire, collectives) and as checkpoint arrays ------------
    @property
    def size(self) -> int:
        return 1 + 2 * int(np.prod(self.shape, dtype=np.int64))

    def vector(self) -> np.ndarray:
        return np.concatenate([[self.count], self.mean.ravel(), self.m2.ravel()])

    def set_vector(self, vector: np.ndarray) -> None:
        n = (self.size - 1) // 2
        vector = np.asarray(vector, np.float64)
        self.count = float(vector[0])
        self.mean = vector[1 : 1 + n].reshape(self.shape).copy()
        self.m2 = vector[1 + n : 1 + 2 * n].reshape(self.shape).copy()

    def merge_vector(self, vector: np.ndarray) -> None:
        part = RunningMeanStd(self.shape)
        part.set_vector(vector)
        self.absorb(part)


class Normalizer:
    """The observation and return statistics of one learner, and how they are applied.

    ``used``/``fresh`` hold ``[obs, ret]`` (see the module docstring); ``returns`` is each
    env's running discounted return. With both switches off it is the identity and costs
    nothing.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        num_envs: int,
        *,
        obs: bool,
        reward: bool,
        gamma: float = 0.99,
        obs_clip: float = 10.0,
        reward_clip: float = 10.0,
    ) -> None:
        self.on_obs, self.on_reward = obs, reward
        self.gamma, self.obs_clip, self.reward_clip = gamma, obs_clip, reward_clip
        self.used = [RunningMeanStd(obs_shape if obs else (0,)), RunningMeanStd(() if reward else (0,))]
        self.fresh = [RunningMeanStd(s.shape) for s in self.used]
        self.returns = np.zeros(num_envs, np.float64)
        self.version = 0  # changes whenever the statistics in use do (for cached copies)

    @property
    def active(self) -> bool:
        return self.on_obs or self.on_reward

    # -- applying them -----------------------------------------------------------------------
    def observe(self, obs: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Count observations the envs returned (``valid``: the ones that count)."""
        if self.on_obs:
            self.fresh[0].update(obs if valid is None else np.asarray(obs)[valid])

    def obs(self, obs: Any) -> Any:
        """Observations as the networks see them (float32; unchanged when switched off)."""
        if not self.on_obs:
            return obs
        stats = self.used[0]
        out = (np.asarray(obs, np.float64) - stats.mean) / np.sqrt(stats.var + EPS)
        return np.clip(out, -self.obs_clip, self.obs_clip).astype(np.float32)

    def track(self, rewards: np.ndarray, done: np.ndarray, valid: np.ndarray) -> None:
        """Advance each env's discounted return by one vector step and count the valid ones.

        ``done``: episodes that ended (their returns restart at 0), as do the envs whose step
        is not ``valid`` (an autoreset step, an env restarted or quarantined mid-episode).
        """
        if not self.on_reward:
            return
        valid = np.asarray(valid, bool)
        self.returns = np.where(valid, self.returns * self.gamma + rewards, self.returns)
        self.fresh[1].update(self.returns[valid])
        self.returns[np.asarray(done, bool) | ~valid] = 0.0

    def scale(self, rewards: Any) -> Any:
        """Rewards (or sums of discounted rewards) divided by the return's std, clipped."""
        if not self.on_reward:
            return rewards
        std = float(np.sqrt(self.used[1].var + EPS))
        if hasattr(rewards, "clamp"):  # a torch tensor (a sampled batch) stays one
            return (rewards / std).clamp(-self.reward_clip, self.reward_clip)
        return np.clip(np.asarray(rewards) / std, -self.reward_clip, self.reward_clip).astype(np.float32)

    def new_episodes(self, envs: np.ndarray | None = None) -> None:
        """The episodes of ``envs`` (default: all) start afresh: their returns restart at 0."""
        self.returns[slice(None) if envs is None else np.asarray(envs, bool)] = 0.0

    # -- merging ---------------------------------------------------------------------------------
    def fresh_vector(self) -> np.ndarray:
        """What was seen since the last merge, as one float64 vector (for the strategy)."""
        return np.concatenate([s.vector() for s in self.fresh])

    def used_vector(self) -> np.ndarray:
        return np.concatenate([s.vector() for s in self.used])

    @property
    def size(self) -> int:
        return sum(s.size for s in self.used)

    def _split(self, vector: np.ndarray) -> list[np.ndarray]:
        return np.split(np.asarray(vector, np.float64), [self.used[0].size])

    def take_fresh(self) -> np.ndarray:
        """The data seen since the last merge, as one float64 vector; fresh restarts empty."""
        vector = self.fresh_vector()
        for stats in self.fresh:
            stats.reset()
        return vector

    def merge(self, vectors: list[np.ndarray]) -> None:
        """Fold fresh-data vectors (every worker's, in rank order) into the statistics in use."""
        for vector in vectors:
            for stats, part in zip(self.used, self._split(vector)):
                stats.merge_vector(part)
        self.version += 1

    def set_used(self, vector: np.ndarray) -> None:
        """Take statistics merged elsewhere (the parameter server's) as the ones in use."""
        for stats, part in zip(self.used, self._split(vector)):
            stats.set_vector(part)
        self.version += 1

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"used": self.used_vector(), "fresh": self.fresh_vector(), "returns": self.returns.copy()}
        return arrays, {"obs": self.on_obs, "reward": self.on_reward}

    def load(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], *, fresh: bool = True) -> None:
        """Restore; ``fresh=False`` drops the saver's unmerged data (another worker's to merge)."""
        if (bool(meta["obs"]), bool(meta["reward"])) != (self.on_obs, self.on_reward):
            raise ValueError("the checkpoint's normalisation settings differ from this run's")
        used, new, returns = (np.asarray(arrays[k], np.float64) for k in ("used", "fresh", "returns"))
        if used.shape != (self.size,) or new.shape != (self.size,) or returns.shape != self.returns.shape:
            raise ValueError("normalisation statistics of another shape")
        if not (np.isfinite(used).all() and np.isfinite(new).all() and np.isfinite(returns).all()):
            raise ValueError("normalisation statistics are not finite")
        for vector in (used, new):
            for part, stats in zip(self._split(vector), self.used):
                n = (stats.size - 1) // 2
                if part[0] < 0 or (part[1 + n :] < 0).any():
                    raise ValueError("normalisation statistics with a negative count or variance")
        self.set_used(used)
        for stats, part in zip(self.fresh, self._split(new if fresh else np.zeros_like(new))):
            stats.set_vector(part)
        self.returns = returns.copy()

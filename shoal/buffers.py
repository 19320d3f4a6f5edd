"""Experience storage: a rollout buffer for on-policy methods, replay buffers for DQN, SAC
and TD3 (one of them for stacked frames, which it stores once each).

Vector envs reset with gymnasium's next-step autoreset: the step after an episode ends
returns the first observation of the next episode, with reward 0, and ignores the action.
Such steps are stored with ``valid=False`` and never trained on; the observation stored
right after a truncated step is its final observation, which is what a truncated
episode's value bootstrap needs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger("shoal")


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
    How an observation is held is the one thing a subclass changes (:class:`FrameReplayBuffer`
    holds frame indices): ``_allocate``, ``_hold``, ``_release``, ``_put`` and ``_observations``.
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
        self.actions = np.zeros((capacity, *action_shape), dtype=action_dtype)
        self.returns = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.pos, self.size = 0, 0
        self.pending: list[list[tuple]] = [[] for _ in range(num_envs)]  # per env, oldest first
        self._allocate(num_envs, obs_shape, obs_dtype)

    # -- how observations are held: whole, in two arrays ---------------------------------
    def _allocate(self, num_envs: int, obs_shape: tuple, obs_dtype: np.dtype) -> None:
        self.obs = np.zeros((self.capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros((self.capacity, *obs_shape), dtype=obs_dtype)

    def _hold(self, env: int, obs: np.ndarray, next_obs: np.ndarray) -> tuple[Any, Any]:
        """What a pending transition of ``env`` keeps of ``obs``, and of ``next_obs``."""
        return obs, next_obs

    def _release(self, held: Any) -> None:
        """A pending transition's observation is stored or dropped."""

    def _put(self, i: int, obs: Any, next_obs: Any) -> None:
        self.obs[i], self.next_obs[i] = obs, next_obs

    def _observations(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.obs[idx], self.next_obs[idx]

    # -- transitions ----------------------------------------------------------------------
    def _store(self, obs: Any, action: Any, ret: float, next_obs: Any, discount: float) -> None:
        i = self.pos
        self._put(i, obs, next_obs)
        self.actions[i], self.returns[i], self.discounts[i] = action, ret, discount
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
            first, following = self._hold(e, obs[e], next_obs[e])
            queue = self.pending[e]
            queue.append((first, actions[e], float(rewards[e])))
            ended = bool(terminated[e] or truncated[e])
            while queue and (len(queue) == self.n_step or ended):
                ret = sum(r * self.gamma**k for k, (_, _, r) in enumerate(queue))
                discount = 0.0 if terminated[e] else self.gamma ** len(queue)
                first_obs, first_action, _ = queue.pop(0)
                self._store(first_obs, first_action, ret, following, discount)
                self._release(first_obs)

    def clear_pending(self, envs: np.ndarray | None = None) -> None:
        """Drop partial n-step transitions of ``envs`` (default: all): their episodes are cut short."""
        for e, queue in enumerate(self.pending):
            if envs is None or envs[e]:
                for held, _, _ in queue:
                    self._release(held)
                queue.clear()

    def sample(self, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        idx = rng.integers(0, self.size, batch)
        obs, next_obs = self._observations(idx)
        return obs, self.actions[idx], self.returns[idx], next_obs, self.discounts[idx]

    # -- state ----------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"pos": self.pos, "size": self.size, "pending": [len(q) for q in self.pending]}

    def _restorable(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
        if not arrays:  # a checkpoint for acting (the best one) holds no transitions: start empty
            return False
        if any(meta["pending"]):
            raise ValueError("a replay buffer with partial n-step transitions cannot be restored")
        if int(meta["size"]) > self.capacity:  # e.g. saved before a group split its buffer_size
            raise ValueError(
                f"the checkpoint's replay buffer holds {int(meta['size']):,} transitions, more than"
                f" this one's capacity of {self.capacity:,} (the workers of sync, param-avg and a"
                " synchronous param-server split buffer_size between them); start a fresh run"
            )
        return True

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (for safetensors) and scalars (for JSON) of the whole buffer."""
        arrays = {
            k: getattr(self, k)[: self.size] for k in ("obs", "next_obs", "actions", "returns", "discounts")
        }
        return arrays, self._meta()

    def load(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if not self._restorable(arrays, meta):
            return
        for key, value in arrays.items():
            getattr(self, key)[: len(value)] = value
        self.pos, self.size = int(meta["pos"]), int(meta["size"])


UNUSED = np.iinfo(np.int64).min  # the owner of a frame no stored transition uses


def stacked_frames(shape: tuple, dtype: np.dtype) -> bool:
    """uint8 ``(k, H, W)`` with ``k >= 2`` stacked frames (FrameStackObservation), not an
    ``(H, W, C)`` image: the observations a :class:`FrameReplayBuffer` stores compactly."""
    return np.dtype(dtype) == np.uint8 and len(shape) == 3 and 2 <= shape[0] < min(shape[1:])


class FrameReplayBuffer(ReplayBuffer):
    """:class:`ReplayBuffer` for stacked frames, storing each distinct frame once.

    Consecutive observations of one env share ``k - 1`` of their ``k`` frames, and a
    transition's next observation is a later one's observation, so a transition stores two
    rows of ``k`` frame indices into a frame store rather than two whole stacks. Sharing is
    decided from the data alone: per env, an observation equal to the previous one reuses its
    frames, one whose first ``k - 1`` frames are the previous one's last ``k - 1`` adds one
    frame, anything else (a reset) adds its whole stack. The store is written as a ring; a
    frame can be overwritten once every transition using it has been (``owner``, the newest
    such transition's number, is older than the ring) and no pending n-step transition or
    env's last observation holds it (``pins``). If the slots ahead are still in use (episodes
    so short that frames outnumber transitions by more than the reserve), the store grows.
    Transitions, n-step returns, sampling and ``pos``/``size`` are ReplayBuffer's own.
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
        if np.dtype(obs_dtype) != np.uint8 or len(obs_shape) != 3 or obs_shape[0] < 2:
            raise ValueError(f"FrameReplayBuffer stores uint8 (k, H, W) frame stacks, not {obs_shape}")
        super().__init__(capacity, num_envs, obs_shape, obs_dtype, action_shape, action_dtype, n_step, gamma)

    def _allocate(self, num_envs: int, obs_shape: tuple, obs_dtype: np.dtype) -> None:
        self.k, self.frame_shape = obs_shape[0], tuple(obs_shape[1:])
        # At most this many frames are held by pending transitions and last observations.
        self.pinned_max = num_envs * self.k * (self.n_step + 1)
        self.obs_frames = np.zeros((self.capacity, self.k), dtype=np.int32)  # indices into frames
        self.next_frames = np.zeros((self.capacity, self.k), dtype=np.int32)
        self.stored = 0  # transitions ever stored: the number of the next one
        self.last = np.full((num_envs, self.k), -1, dtype=np.int64)  # each env's newest observation
        self._in_flight: tuple[np.ndarray, ...] = ()
        self.counted = self.frames_for(self.capacity, num_envs, self.k, self.n_step)  # by the memory check
        self._allocate_frames(self.counted)

    @staticmethod
    def frames_for(capacity: int, num_envs: int, k: int, n_step: int) -> int:
        """Initial frame slots: one per transition, an eighth more for episode starts (a reset
        adds ``k`` frames), and room for the pinned frames and one more stack."""
        return capacity + capacity // 8 + num_envs * k * (n_step + 1) + k

    @classmethod
    def nbytes(cls, capacity: int, num_envs: int, obs_shape: tuple, action_bytes: int, n_step: int) -> int:
        """Bytes of the arrays a new buffer allocates (what the start-up memory check counts)."""
        k, frame = obs_shape[0], int(np.prod(obs_shape[1:]))
        slots = cls.frames_for(capacity, num_envs, k, n_step)
        per_transition = 2 * k * 4 + action_bytes + 4 + 4  # two index rows, action, return, discount
        return slots * (frame + 8 + 4) + capacity * per_transition + num_envs * k * 8

    def _allocate_frames(self, slots: int) -> None:
        self.frames = np.zeros((slots, *self.frame_shape), dtype=np.uint8)
        self.owner = np.full(slots, UNUSED, dtype=np.int64)  # newest transition using the frame
        self.pins = np.zeros(slots, dtype=np.int32)  # pending transitions / last obs using it
        self.head = 0  # where the ring writes next

    # -- frames ---------------------------------------------------------------------------
    def _write(self, stack: np.ndarray) -> np.ndarray:
        """Store ``stack``'s frames in free slots at the ring's head; their indices."""
        m = len(stack)
        while True:
            window = (self.head + np.arange(m + self.pinned_max)) % len(self.frames)
            free = (self.owner[window] < self.stored - self.capacity) & (self.pins[window] == 0)
            slots = window[free][:m]
            if len(slots) == m:
                break
            self._grow(m + self.pinned_max)
        self.frames[slots] = stack
        self.owner[slots] = UNUSED
        self.head = (int(slots[-1]) + 1) % len(self.frames)
        return slots

    def _grow(self, needed: int) -> None:
        """Insert free slots at the head (the ring's oldest frames follow them): frame indices
        at or past the head move up. Rare: only episodes much shorter than usual need it."""
        at, extra = self.head, max(needed, len(self.frames) // 8)
        self.frames = np.concatenate(
            [self.frames[:at], np.zeros((extra, *self.frame_shape), np.uint8), self.frames[at:]]
        )
        self.owner = np.concatenate([self.owner[:at], np.full(extra, UNUSED, np.int64), self.owner[at:]])
        self.pins = np.concatenate([self.pins[:at], np.zeros(extra, np.int32), self.pins[at:]])
        now, counted = (n * self.frames[0].nbytes / 1e9 for n in (len(self.frames), self.counted))
        log.warning(
            f"the replay's frame store grew to {len(self.frames):,} frames ({now:.2f} GB; the start-up memory"
            f" check counted {counted:.2f} GB): episodes here average under ~{8 * self.k} steps"
        )
        for indices in (
            self.obs_frames,
            self.next_frames,
            self.last,
            *self._in_flight,
            *(f for q in self.pending for f, _, _ in q),
        ):
            indices[indices >= at] += extra

    def _frames_of(
        self, stack: np.ndarray, known: np.ndarray | None, known_stack: np.ndarray | None
    ) -> np.ndarray:
        """Frame indices for ``stack``, sharing with the stack ``known`` (its indices) it follows."""
        if known is not None:
            if np.array_equal(stack, known_stack):
                return known.copy()
            if np.array_equal(stack[:-1], known_stack[1:]):
                new = self._write(stack[-1:])  # may move ``known`` (it is pinned, so remapped in place)
                return np.append(known[1:], new)
        return self._write(stack)

    def _pin(self, indices: np.ndarray, by: int) -> None:
        self.pins[indices] += by  # a stack's indices are distinct slots: no repeated index

    # -- how observations are held: frame indices, pinned while pending ------------------
    def _hold(self, env: int, obs: np.ndarray, next_obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        last = self.last[env] if self.last[env, 0] >= 0 else None  # a view: moved in place by _grow
        first = self._frames_of(obs, last, None if last is None else self.frames[last])
        self._pin(first, 1)
        self._in_flight = (first,)  # not queued yet: _grow moves it as it moves the queued ones
        following = self._frames_of(next_obs, first, obs)
        self._in_flight = ()
        self._pin(following, 1)
        if last is not None:
            self._pin(self.last[env], -1)
        self.last[env] = following
        return first, following

    def _release(self, held: np.ndarray) -> None:
        self._pin(held, -1)

    def _put(self, i: int, obs: np.ndarray, next_obs: np.ndarray) -> None:
        self.obs_frames[i], self.next_frames[i] = obs, next_obs
        self.owner[obs] = self.owner[next_obs] = self.stored  # numbers only grow: the newest user
        self.stored += 1

    def _observations(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whole stacks, one gather each for the observations and the next observations."""
        return self.frames[self.obs_frames[idx]], self.frames[self.next_frames[idx]]

    # -- state ----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The stored transitions with only the frames they use, oldest written first."""
        used = np.concatenate([self.obs_frames[: self.size], self.next_frames[: self.size]]).ravel()
        age, rows = np.unique((used - self.head) % len(self.frames), return_inverse=True)
        rows = rows.reshape(2, self.size, self.k).astype(np.int32)
        arrays = {
            "frames": self.frames[(age + self.head) % len(self.frames)],
            "obs_frames": rows[0],
            "next_frames": rows[1],
            **{k: getattr(self, k)[: self.size] for k in ("actions", "returns", "discounts")},
        }
        return arrays, self._meta()

    def load(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Restore ``state()``, or a ReplayBuffer's (whole stacks: each becomes ``k`` frames)."""
        if not self._restorable(arrays, meta):
            return
        self.pos, self.size = int(meta["pos"]), int(meta["size"])
        if "obs" in arrays:  # saved by a ReplayBuffer
            stacks = np.concatenate([arrays["obs"], arrays["next_obs"]])
            rows = np.arange(len(stacks) * self.k).reshape(2, self.size, self.k)
            arrays = {**arrays, "frames": stacks.reshape(-1, *self.frame_shape)}
            arrays["obs_frames"], arrays["next_frames"] = rows
        frames = arrays["frames"]
        self._allocate_frames(
            max(len(self.frames), len(frames) + len(frames) // 8 + self.pinned_max + self.k)
        )
        self.frames[: len(frames)] = frames
        self.head = len(frames)
        for key in ("obs_frames", "next_frames", "actions", "returns", "discounts"):
            getattr(self, key)[: self.size] = arrays[key]
        self.stored = self.size if self.size < self.capacity else self.capacity + self.pos
        # transition i's number: the oldest (at pos - size) is stored - size
        number = self.stored - self.size + (np.arange(self.size) - (self.pos - self.size)) % self.capacity
        for rows in (self.obs_frames, self.next_frames):
            np.maximum.at(self.owner, rows[: self.size], number[:, None])
        self.last[:] = -1
        for queue in self.pending:
            queue.clear()


def make_replay(
    capacity: int,
    num_envs: int,
    obs_shape: tuple,
    obs_dtype: np.dtype,
    action_shape: tuple,
    action_dtype: np.dtype,
    n_step: int,
    gamma: float,
) -> ReplayBuffer | FrameReplayBuffer:
    """A FrameReplayBuffer for stacked frames (about 8x smaller), a ReplayBuffer otherwise."""
    cls = FrameReplayBuffer if stacked_frames(obs_shape, obs_dtype) else ReplayBuffer
    return cls(capacity, num_envs, obs_shape, obs_dtype, action_shape, action_dtype, n_step, gamma)

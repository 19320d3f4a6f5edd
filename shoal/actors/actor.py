"""An actor: its own vector env and a CPU copy of the policy, filling trajectory slots.

Each actor process loops: refresh the policy from the weight buffer (every
``refresh_every`` trajectories, when a newer version is there), take one of its free slots,
act ``rollout_length`` vector steps into it, seal it with the version that acted and send
its index to the learner. It knows nothing of the algorithm but its network
(``actor_network``) and the vector that loads it (:func:`policy_vector`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from shoal.actors.shared import ERROR_TAG, TrajectoryRing, WeightBuffer, pack_index, unpack_index
from shoal.envs.atari import game_scores, reports_games
from shoal.normalize import EPS, Normalizer
from shoal.training.episodes import Episodes

# control: shared int64 numbers the learner and actors read without locks.
STOP = 0  # [STOP]: 1 asks every actor to finish; then per actor: trajectories sent, sum of their CRCs


def produced_at(actor: int) -> tuple[int, int]:
    """Indices in ``control`` of the actor's count of trajectories sent and of their CRC sum."""
    return 1 + 2 * actor, 2 + 2 * actor


CRC_MOD = 1 << 62


def policy_vector(net: torch.nn.Module, normalizer: Normalizer) -> np.ndarray:
    """What an actor needs to act as the learner's policy: its weights, then the observation
    statistics in use (mean, var) when observations are normalised."""
    parts = [torch.nn.utils.parameters_to_vector(net.parameters()).detach().cpu().numpy()]
    if normalizer.on_obs:
        stats = normalizer.used[0]
        parts += [stats.mean.reshape(-1), stats.var.reshape(-1)]
    return np.concatenate(parts).astype(np.float32)


class ActorPolicy:
    """The actor's copy of the policy: loads a :func:`policy_vector`, samples actions."""

    def __init__(
        self, net: torch.nn.Module, action_space: spaces.Space, normalize_obs: bool, obs_clip: float
    ):
        self.net, self.action_space = net, action_space
        self.num_weights = sum(p.numel() for p in net.parameters())
        self.normalize_obs, self.obs_clip = normalize_obs, obs_clip
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def load(self, vector: np.ndarray) -> None:
        n = self.num_weights
        torch.nn.utils.vector_to_parameters(torch.from_numpy(vector[:n].copy()), self.net.parameters())
        if self.normalize_obs:
            mean, var = np.split(vector[n:].astype(np.float64), 2)
            self.mean = torch.as_tensor(mean, dtype=torch.float32)
            self.std = torch.as_tensor(np.sqrt(var + EPS), dtype=torch.float32)

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(actions for the env, actions as the network sampled them, their log-probabilities)."""
        x = torch.as_tensor(obs)
        if self.mean is not None and self.std is not None:
            x = ((x.reshape(len(x), -1).float() - self.mean) / self.std).clamp_(-self.obs_clip, self.obs_clip)
            x = x.reshape(obs.shape)
        with torch.inference_mode():
            action, logprob = self.net.sample(x)
        raw = action.numpy()
        env_actions = raw
        if isinstance(self.action_space, spaces.Box):
            low, high = self.action_space.low, self.action_space.high
            env_actions = np.clip(raw, low, high).astype(self.action_space.dtype)
        return env_actions, raw, logprob.numpy()


@dataclass
class ActorJob:
    """Everything an actor process is started with (pickled once, at its start)."""

    actor: int
    algo: str
    config: Any
    ring: TrajectoryRing
    weights: WeightBuffer
    control: Any  # RawArray("q"): see STOP
    parent_pid: int
    boundary: int = 0  # the checkpoint boundary the run started from (a resume: fresh episodes)
    generation: int = 0  # how many actors this one replaces (each lost one: fresh episodes)

    @property
    def seed(self) -> int:
        return actor_seed(self.config, self.actor, self.boundary, self.generation)


def actor_seed(config: Any, actor: int, boundary: int, generation: int = 0) -> int:
    """The actor's envs and sampling: its own stream, derived from the run seed (either pool)."""
    return config.seed + 1_000_003 * (actor + 1) + 10_007 * boundary + 7_919 * generation


def actor_main(job: ActorJob, conn: Connection) -> None:
    """An actor process: ignores SIGINT/SIGTERM (the learner stops it), leaves if the learner dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Forked from a learner showing a progress bar, sys.stdout/stderr are the bar's proxies,
    # whose lock its refresh thread (not forked) may hold: write to the real streams.
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(15, f"shoal-actor-{job.actor}".encode()[:15], 0, 0, 0)  # PR_SET_NAME
    threading.Thread(target=_orphan_watch, args=(job.parent_pid,), daemon=True).start()
    with contextlib.suppress(OSError):  # below the learner: it is the one everybody waits on
        os.nice(job.config.actor_nice)
    code = 1
    try:
        run_actor(job, conn)
        code = 0
    except BaseException as error:
        text = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
        with contextlib.suppress(Exception):
            conn.send_bytes(ERROR_TAG + text.encode())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: nothing of ours is left to flush


def _orphan_watch(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:  # the learner is gone, even by SIGKILL
            os._exit(1)
        time.sleep(0.5)


def actor_policy(algo: str, c: Any, seed: int) -> ActorPolicy:
    """The policy copy an actor acts with (weights not loaded yet), its torch seeded."""
    from shoal.algos import ALGORITHMS
    from shoal.training.trainer import env_of, spaces_of

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    obs_space, action_space = spaces_of(env_of(c))
    net = ALGORITHMS[algo].actor_network(c, obs_space, action_space)
    return ActorPolicy(net, action_space, bool(c.normalize_obs), c.obs_clip)


def actor_envs(c: Any, seed: int) -> Any:
    """An actor's vector env (in-process by default: the actor is a process of its own)."""
    from shoal.envs import make_vec
    from shoal.training.trainer import env_of

    return make_vec(
        env_of(c),
        c.num_envs,
        seed=seed,
        vectorization="sync" if c.vectorization == "auto" else c.vectorization,
        num_workers=c.env_workers or 1,
        on_error=c.on_env_error,
        step_timeout=c.step_timeout or None,
    )


def run_actor(job: ActorJob, conn: Connection) -> None:
    from shoal.training.callbacks import FaultInjection

    c, ring, control = job.config, job.ring, np.frombuffer(job.control, dtype=np.int64)
    faults = FaultInjection.from_environment(job.actor)  # the test suite's, at set trajectory counts
    policy = actor_policy(job.algo, c, job.seed)
    vector = np.zeros(job.weights.size, np.float32)
    version = _wait_for_weights(job, vector, control)
    if version is None:
        return
    policy.load(vector)
    envs = actor_envs(c, job.seed)
    try:
        free = ring.owned(job.actor)
        obs, _ = envs.reset(seed=job.seed)
        carry = _Carry(c)
        sent, crc_sum = produced_at(job.actor)
        seq = 0
        while not control[STOP]:
            if seq % c.refresh_every == 0:
                newer = job.weights.read(vector, newer_than=version)
                if newer is not None:
                    policy.load(vector)
                    version = newer
            slot = _free_slot(conn, free, control)
            if slot is None:
                return
            obs = _fill(ring.slot(slot), envs, policy, obs, carry, c.nan_policy)
            crc = ring.seal(slot, version=version, actor=job.actor, seq=seq)
            control[sent] += 1  # (before the index leaves: the learner never sees more than counted)
            control[crc_sum] = (int(control[crc_sum]) + crc) % CRC_MOD
            conn.send_bytes(pack_index(slot))
            seq += 1
            if faults is not None:
                faults.after_trajectories(seq)
    finally:
        envs.close()


def _wait_for_weights(job: ActorJob, vector: np.ndarray, control: np.ndarray) -> int | None:
    while not control[STOP]:
        version = job.weights.read(vector)
        if version:
            return version
        time.sleep(0.01)
    return None


def _free_slot(conn: Connection, free: list[int], control: np.ndarray) -> int | None:
    """One of the actor's free slots, waiting for the learner to free one (None: stopping)."""
    while not free:
        if control[STOP]:
            return None
        if conn.poll(0.1):
            free.append(unpack_index(conn.recv_bytes()))
    while conn.poll():  # take every index the learner freed meanwhile
        free.append(unpack_index(conn.recv_bytes()))
    return free.pop(0)


class _Carry:
    """What an actor keeps from one trajectory to the next: each env's episode in progress
    (whole games for Atari, as the learner's own loop logs them) and which envs' next step
    is an autoreset."""

    def __init__(self, config: Any) -> None:
        from shoal.training.trainer import env_of

        self.episodes = Episodes(config.num_envs, games=reports_games(env_of(config)))
        self.autoreset = np.zeros(config.num_envs, bool)


def _fill(
    slot: dict[str, np.ndarray],
    envs: Any,
    policy: ActorPolicy,
    obs: np.ndarray,
    carry: _Carry,
    nan_policy: str,
) -> np.ndarray:
    """Act ``rollout_length`` steps into ``slot``; return the observation to continue from."""
    steps = slot["rewards"].shape[0]
    for t in range(steps):
        slot["obs"][t] = obs
        env_actions, actions, logprobs = policy.act(obs)
        slot["actions"][t] = actions
        slot["logprobs"][t] = logprobs
        obs, rewards, terminated, truncated, infos = envs.step(env_actions)
        if not (np.isfinite(rewards).all() and (obs.dtype.kind != "f" or np.isfinite(obs).all())):
            from shoal.guards import NonFiniteError

            raise NonFiniteError("an env returned a NaN or inf observation or reward (--nan-policy raise)")
        valid = ~carry.autoreset
        ended, returns, lengths = carry.episodes.end(
            rewards, valid, terminated | truncated, game_scores(infos) if carry.episodes.games else None
        )
        slot["rewards"][t] = rewards
        slot["terminated"][t] = terminated
        slot["truncated"][t] = truncated
        slot["valid"][t] = valid
        slot["episode_return"][t] = np.nan
        slot["episode_return"][t, ended] = returns
        slot["episode_length"][t] = 0
        slot["episode_length"][t, ended] = lengths
        carry.autoreset = terminated | truncated
    slot["obs"][steps] = obs
    return obs

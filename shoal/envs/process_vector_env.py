"""ProcessVectorEnv: gymnasium's AsyncVectorEnv, with several envs per process.

gymnasium's ``AsyncVectorEnv`` runs one process per env and pickles every step result
through a pipe, so on a few cores it is slower than stepping the envs in a loop. Here each
env worker steps a contiguous slice of the envs and writes observations, rewards and done
flags straight into shared memory; a step costs one short pipe message per worker each
way. The public API is AsyncVectorEnv's, plus ``num_workers`` and EnvPool-style
``send``/``recv`` for envs whose step times vary.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from copy import deepcopy
from enum import Enum
from multiprocessing.connection import wait
from typing import Any

import numpy as np
from gymnasium import Env, Space
from gymnasium.error import (
    AlreadyPendingCallError,
    ClosedEnvironmentError,
    CustomSpaceError,
    NoAsyncCallError,
)
from gymnasium.vector.utils import (
    CloudpickleWrapper,
    batch_differing_spaces,
    batch_space,
    clear_mpi_env_vars,
    concatenate,
    create_empty_array,
    create_shared_memory,
    read_from_shared_memory,
)
from gymnasium.vector.vector_env import AutoresetMode, VectorEnv

from shoal.envs import _worker as w
from shoal.envs._spaces import assign_batch, gather_batch, is_flat_batchable, make_reader

__all__ = ["ProcessVectorEnv", "EnvWorkerError"]


log = logging.getLogger("shoal")


class EnvWorkerError(RuntimeError):
    """An env worker process died or stopped answering."""


class _State(Enum):
    DEFAULT = "default"
    WAITING_RESET = "reset"
    WAITING_STEP = "step"
    WAITING_CALL = "call"


class _InfoBatch:
    """Lets gymnasium's info merging build arrays of any batch size (used by ``recv``)."""

    _add_info = VectorEnv._add_info

    def __init__(self, n: int) -> None:
        self.num_envs = n


DEATH_CHECK_S = 0.1  # how often a waiting parent checks that its workers are alive


def _split(num_envs: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal slices: worker k steps envs [lo, hi)."""
    bounds = np.linspace(0, num_envs, num_workers + 1).round().astype(int)
    return [(int(bounds[k]), int(bounds[k + 1])) for k in range(num_workers)]


def _shutdown(processes: list[Any], conns: list[Any]) -> None:
    """Last-resort cleanup (garbage collection, interpreter exit): no child survives."""
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.close()
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2)


class ProcessVectorEnv(VectorEnv):
    """Vector env whose envs are stepped by ``num_workers`` processes, several envs each.

    Args:
        env_fns: functions creating the environments, one per env.
        shared_memory: pass observations through shared memory (else pickled through pipes,
            needed for spaces gymnasium cannot put in shared memory).
        copy: return a copy of the observations (else a view that the next step overwrites).
        context: multiprocessing start method (``None``: the platform default).
        daemon: mark worker processes as daemons.
        worker: unsupported (gymnasium's per-env worker function); must be ``None``.
        observation_mode: ``"same"``, ``"different"`` or a ``(batched, single)`` space pair.
        autoreset_mode: gymnasium's autoreset mode (next-step, same-step or disabled).
        max_concurrency: at most this many envs step at once; sets ``num_workers`` when
            that is not given.
        num_workers: number of env worker processes; default ``min(num_envs, cpu count)``.
        batch_size: how many envs :meth:`recv` returns (default: all of them).
        on_failure: what :meth:`step` does when a worker dies, raises or hangs: ``"raise"``
            (gymnasium's behaviour) or ``"restart"``: start the worker again with fresh envs,
            reset them and mark them in ``info["env_worker_restarted"]`` (their step result
            is the first observation of a new episode, reward 0, not done).
        step_timeout: seconds a step may take before its worker counts as hung (``None``:
            no limit); with ``"restart"`` a hung worker is killed and restarted.
        reseed: ``reseed(env_index, restart_number)``: the seed a restarted env is reset
            with (default: no seed); makes runs with faults reproducible.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Env]],
        shared_memory: bool = True,
        copy: bool = True,
        context: str | None = None,
        daemon: bool = True,
        worker: Callable[..., None] | None = None,
        observation_mode: str | tuple[Space, Space] = "same",
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        max_concurrency: int | None = None,
        *,
        num_workers: int | None = None,
        batch_size: int | None = None,
        on_failure: str = "raise",
        step_timeout: float | None = None,
        reseed: Callable[[int, int], int | None] | None = None,
    ) -> None:
        self.closed = True  # until the workers are up, close() has nothing to do
        self.env_fns = env_fns
        self.num_envs = len(env_fns)
        if self.num_envs < 1:
            raise ValueError("ProcessVectorEnv needs at least one env function, got none")
        if worker is not None:
            raise ValueError(
                "ProcessVectorEnv steps several envs per process and cannot take gymnasium's "
                "per-env `worker` function; use gymnasium.vector.AsyncVectorEnv for that"
            )
        if max_concurrency is not None and (
            not isinstance(max_concurrency, (int, np.integer)) or max_concurrency < 1
        ):
            raise ValueError(f"`max_concurrency` must be a positive integer, got {max_concurrency}")
        if num_workers is None:
            num_workers = max_concurrency or os.cpu_count() or 1
        if not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
            raise ValueError(f"`num_workers` must be a positive integer, got {num_workers!r}")
        self.num_workers = int(min(num_workers, self.num_envs))
        if batch_size is None:
            batch_size = self.num_envs
        if not 1 <= batch_size <= self.num_envs:
            raise ValueError(f"`batch_size` must be in [1, num_envs={self.num_envs}], got {batch_size}")
        self.batch_size = int(batch_size)
        if on_failure not in ("raise", "restart"):
            raise ValueError(f"`on_failure` must be 'raise' or 'restart', got {on_failure!r}")
        if step_timeout is not None and not step_timeout > 0:
            raise ValueError(f"`step_timeout` must be > 0 seconds or None, got {step_timeout}")
        self.on_failure, self.step_timeout, self.reseed = on_failure, step_timeout, reseed
        self.worker_restarts = 0  # env worker processes started again after a failure
        self.shared_memory = shared_memory
        self.copy = copy
        self.context = context
        self.daemon = daemon
        self.observation_mode = observation_mode
        self.autoreset_mode = (
            autoreset_mode if isinstance(autoreset_mode, AutoresetMode) else AutoresetMode(autoreset_mode)
        )

        dummy_env = env_fns[0]()
        self.metadata = dict(dummy_env.metadata)
        self.metadata["autoreset_mode"] = self.autoreset_mode
        self.render_mode = dummy_env.render_mode
        self.single_action_space = dummy_env.action_space
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        if isinstance(observation_mode, tuple) and len(observation_mode) == 2:
            if not all(isinstance(s, Space) for s in observation_mode):
                raise TypeError(
                    "Expected both elements of observation_mode to be Spaces, got "
                    f"{type(observation_mode[0])} and {type(observation_mode[1])}"
                )
            self.observation_space, self.single_observation_space = observation_mode
        elif observation_mode == "same":
            self.single_observation_space = dummy_env.observation_space
            self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        elif observation_mode == "different":
            env_spaces = [fn().observation_space for fn in env_fns]
            self.single_observation_space = env_spaces[0]
            self.observation_space = batch_differing_spaces(env_spaces)
        else:
            raise ValueError(
                "Invalid `observation_mode`, expected: 'same' or 'different' or tuple of single "
                f"and batch observation space, actual got {observation_mode}"
            )
        dummy_env.close()
        del dummy_env

        ctx = mp.get_context(context)
        obs_shm = final_shm = act_shm = None
        if shared_memory:
            try:
                obs_shm = create_shared_memory(self.single_observation_space, self.num_envs, ctx)
                if self.autoreset_mode is AutoresetMode.SAME_STEP and is_flat_batchable(
                    self.single_observation_space
                ):
                    final_shm = create_shared_memory(self.single_observation_space, self.num_envs, ctx)
            except CustomSpaceError as e:  # dynamic-shape spaces raise TypeError, as in gymnasium
                raise ValueError(
                    "Using `ProcessVectorEnv(..., shared_memory=True)` caused an error, you can "
                    "disable this feature with `shared_memory=False` however this is slower."
                ) from e
            self.observations = read_from_shared_memory(
                self.single_observation_space, obs_shm, n=self.num_envs
            )
        else:
            self.observations = create_empty_array(
                self.single_observation_space, n=self.num_envs, fn=np.zeros
            )
        self._obs_items: list[Any] = [None] * self.num_envs  # pickled observations, not batched
        self._obs_stale = False  # _obs_items changed since they were last concatenated
        self._final_obs_at = None
        if final_shm is not None:
            views = read_from_shared_memory(self.single_observation_space, final_shm, self.num_envs)
            self._final_obs_at = make_reader(self.single_observation_space, views, copy=True)
        if is_flat_batchable(self.single_action_space):
            act_shm = create_shared_memory(self.single_action_space, self.num_envs, ctx)
            self._action_views = read_from_shared_memory(self.single_action_space, act_shm, n=self.num_envs)
        else:
            self._action_views = None
        buffers = w.SharedBuffers(
            num_envs=self.num_envs,
            obs_space=self.single_observation_space,
            action_space=self.single_action_space,
            obs=obs_shm,
            final_obs=final_shm,
            actions=act_shm,
            rewards=ctx.RawArray(ctypes.c_double, self.num_envs),
            terminations=ctx.RawArray(ctypes.c_bool, self.num_envs),
            truncations=ctx.RawArray(ctypes.c_bool, self.num_envs),
        )
        self._rewards, self._terminations, self._truncations = w.arrays(buffers)

        self.slices = _split(self.num_envs, self.num_workers)
        self._owner = np.concatenate(
            [np.full(hi - lo, k, dtype=np.int64) for k, (lo, hi) in enumerate(self.slices)]
        )
        self.parent_pipes: list[Any] = []
        self.processes: list[Any] = []
        self._ctx, self._buffers = ctx, buffers
        self._go = [ctx.Semaphore(0) for _ in self.slices]  # one token per command
        self._done = [ctx.Semaphore(0) for _ in self.slices]  # one token per reply
        codes = ctx.RawArray(ctypes.c_uint8, 2 * self.num_workers)  # see _worker.Channel
        self._code_array = codes
        self._codes = np.frombuffer(codes, dtype=np.uint8).reshape(self.num_workers, 2)
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, self.parent_pipes)
        for k in range(self.num_workers):
            self._start_worker(k)
        self.closed = False
        self._dead: str | None = None  # why the env can no longer be used
        self._state = _State.DEFAULT
        self._slowest = 0  # the worker whose reply the parent waited for last
        self._late = [0] * self.num_workers  # replies owed after a timed-out wait
        self._in_flight = np.zeros(self.num_envs, dtype=bool)  # envs sent but not received
        self._ready: list[tuple[int, Any]] = []  # (env, info) received, not yet returned
        # on_failure="restart": workers found dead while sending, restarted when collecting.
        self._failed: dict[int, str] = {}
        self._fresh: dict[int, Any] = {}  # idle envs of a worker restarted during send/recv
        self._reset_request: tuple[list[Any], Any, Any] | None = None  # what reset_async sent
        self._busy_since = [0.0] * self.num_workers  # send/recv: when worker k last answered
        try:
            self._check_spaces()
        except BaseException:
            self.close(terminate=True)
            raise

    def _start_worker(self, k: int) -> None:
        """Start (or start again) the process stepping slice ``k``, with fresh envs."""
        ctx = self._ctx
        lo, hi = self.slices[k]
        method = ctx.get_start_method()
        parent, child = ctx.Pipe()
        # A forked worker closes its copies of the parent's pipe ends, its own one included.
        inherited = [p for j, p in enumerate(self.parent_pipes) if j != k] + [parent]
        # PR_SET_PDEATHSIG fires when the thread that started the worker ends, not the process.
        death_signal = method == "forkserver" or threading.current_thread() is threading.main_thread()
        with clear_mpi_env_vars():
            proc = ctx.Process(
                target=w.worker_main,
                name=f"shoal-env-worker-{k}",
                args=(
                    k,
                    CloudpickleWrapper(list(self.env_fns[lo:hi])),
                    lo,
                    child,
                    self._go[k],
                    self._done[k],
                    self._code_array,
                    self._buffers,
                    self.autoreset_mode,
                    os.getpid(),
                    inherited if method == "fork" else [],
                    death_signal,
                ),
                daemon=self.daemon,
            )
            if k < len(self.processes):
                self.parent_pipes[k], self.processes[k] = parent, proc
            else:
                self.parent_pipes.append(parent)
                self.processes.append(proc)
            proc.start()
        child.close()

    # -- properties ----------------------------------------------------------------------
    @property
    def np_random_seed(self) -> tuple[int, ...]:
        """The np_random seed of every sub-environment."""
        return self.get_attr("np_random_seed")

    @property
    def np_random(self) -> tuple[np.random.Generator, ...]:
        """The numpy random generator of every sub-environment."""
        return self.get_attr("np_random")

    # -- reset ---------------------------------------------------------------------------
    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Reset all sub-environments (or those in ``options['reset_mask']``)."""
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(
        self, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> None:
        """Send the reset to every worker; :meth:`reset_wait` collects it."""
        self._assert_is_running()
        if seed is None:
            seed = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seed = [int(seed) + i for i in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise ValueError(
                "If seeds are passed as a list the length must match "
                f"num_envs={self.num_envs} but got length={len(seed)}."
            )
        self._assert_idle("reset_async")
        mask = None
        if options is not None and "reset_mask" in options:
            options = dict(options)
            mask = options.pop("reset_mask")
            if not isinstance(mask, np.ndarray):
                raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
            if mask.shape != (self.num_envs,):
                raise ValueError(
                    f"`options['reset_mask']` must have shape `({self.num_envs},)`, got {mask.shape}"
                )
            if mask.dtype != np.bool_:
                raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
            if not np.any(mask):
                raise ValueError(
                    "`options['reset_mask']` must contain a boolean array with at least one "
                    f"True value, got reset_mask={mask}"
                )
        self._drain_in_flight()
        self._ready.clear()
        self._fresh.clear()
        self._reset_request = (list(seed), options, mask)
        for k, (lo, hi) in enumerate(self.slices):
            sub_mask = None if mask is None else mask[lo:hi].tolist()
            if sub_mask is not None and not any(sub_mask):
                continue  # nothing to reset here: no message, no reply
            self._post(k, w.RESET + pickle.dumps((seed[lo:hi], options, sub_mask)))
        self._waiting = [k for k, (lo, hi) in enumerate(self.slices) if mask is None or mask[lo:hi].any()]
        self._state = _State.WAITING_RESET

    def reset_wait(self, timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Wait for :meth:`reset_async` and return the batched observations and infos."""
        self._assert_is_running()
        if self._state != _State.WAITING_RESET:
            raise NoAsyncCallError(
                "Calling `reset_wait` without any prior call to `reset_async`.",
                _State.WAITING_RESET.value,
            )
        infos = self._collect(timeout, "reset_wait")  # first: the observations land meanwhile
        return self._returned_obs(), infos

    # -- step ----------------------------------------------------------------------------
    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Step every sub-environment with its action and return the batched results."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Send the actions to the workers; :meth:`step_wait` collects the results."""
        self._assert_is_running()
        self._assert_idle("step_async")
        if self._in_flight.any():
            raise AlreadyPendingCallError(
                "Calling `step_async` while envs sent with `send` have not been received; "
                "call `recv` until none is in flight (or `reset`).",
                "send",
            )
        per_env = None
        if self._action_views is None:
            per_env = _iterate(self.action_space, actions, self.num_envs)
        else:
            try:
                assign_batch(self.single_action_space, self._action_views, actions)
            except (ValueError, TypeError):  # not shaped as the batched space: as gymnasium does,
                per_env = _iterate(self.action_space, actions, self.num_envs)  # hand out the items
        if per_env is None:
            for k in range(self.num_workers):
                try:
                    self._drain_late(k)
                except EnvWorkerError:
                    if self.on_failure != "restart":
                        raise
                    self._note_failure(k)
                    continue
                self._codes[k, 0] = w.CODE_STEP  # no pipe message: see _worker.Channel
                self._go[k].release()
        else:
            for k, (lo, hi) in enumerate(self.slices):
                self._post(k, w.STEP + pickle.dumps(per_env[lo:hi]))
        self._waiting = list(range(self.num_workers))
        self._state = _State.WAITING_STEP

    def step_wait(self, timeout: float | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Wait for :meth:`step_async` and return (obs, rewards, terminations, truncations, infos)."""
        self._assert_is_running()
        if self._state != _State.WAITING_STEP:
            raise NoAsyncCallError(
                "Calling `step_wait` without any prior call to `step_async`.",
                _State.WAITING_STEP.value,
            )
        infos = self._collect(timeout, "step_wait")
        if self._fresh:  # restarted while idle during send/recv: this step began a new episode
            infos = self._mark_restarted(infos, list(self._fresh))
            self._fresh.clear()
        return (
            self._returned_obs(),
            np.copy(self._rewards),
            np.copy(self._terminations),
            np.copy(self._truncations),
            infos,
        )

    # -- EnvPool-style asynchronous stepping ---------------------------------------------
    def async_reset(
        self, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> None:
        """Reset every env and make all of them available to :meth:`recv`."""
        self.reset(seed=seed, options=options)
        self._ready = [(i, None) for i in range(self.num_envs)]

    def send(self, actions: Any, env_ids: Any = None) -> None:
        """Step the envs ``env_ids`` (default: all) with ``actions``; returns at once."""
        self._assert_is_running()
        self._assert_idle("send")
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"`env_ids` must be a non-empty 1-D list of env indices, got {env_ids}")
        if ids.min() < 0 or ids.max() >= self.num_envs or len(np.unique(ids)) != len(ids):
            raise ValueError(f"`env_ids` must be distinct indices in [0, {self.num_envs}), got {ids}")
        busy = ids[self._in_flight[ids]]
        if len(busy):
            raise AlreadyPendingCallError(
                f"envs {busy.tolist()} were sent and not yet received; `recv` them first", "send"
            )
        ready = {i for i, _ in self._ready}
        if ready & set(ids.tolist()):
            raise AlreadyPendingCallError(
                "some of `env_ids` finished a step that was not yet returned by `recv`", "send"
            )
        if self._action_views is not None:
            assign_batch(self.single_action_space, self._action_views, actions, ids)
            blobs = {}
        else:
            per_env = _iterate(batch_space(self.single_action_space, len(ids)), actions, len(ids))
            blobs = dict(zip(ids.tolist(), per_env))
        if self._fresh:  # restarted while idle: their new episode's first step is ready now
            fresh = np.isin(ids, list(self._fresh))
            self._ready += [(i, self._fresh.pop(i)) for i in ids[fresh].tolist()]
            ids = ids[~fresh]
        now = time.perf_counter()
        for k in np.unique(self._owner[ids]).tolist():
            lo, hi = self.slices[k]
            if not self._in_flight[lo:hi].any():
                self._busy_since[k] = now  # step_timeout counts from here
            mine = ids[self._owner[ids] == k].astype(np.int32)
            self._in_flight[mine] = True
            extra = pickle.dumps({i: blobs[i] for i in mine.tolist()}) if blobs else b""
            self._post(k, w.STEP_SOME + w._INDEX.pack(len(mine)) + mine.tobytes() + extra)

    def recv(
        self, timeout: float | None = None, batch_size: int | None = None
    ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Return the first ``batch_size`` envs that finished, their ids in ``info['env_id']``."""
        self._assert_is_running()
        self._assert_idle("recv")
        n = self.batch_size if batch_size is None else batch_size
        if n > len(self._ready) + int(self._in_flight.sum()):
            raise NoAsyncCallError(
                f"`recv` of {n} envs but only {len(self._ready) + int(self._in_flight.sum())} "
                "were sent; call `send` (or `async_reset`) first",
                "send",
            )
        deadline = None if timeout is None else time.perf_counter() + timeout
        while len(self._ready) < n:
            for k in list(self._failed):  # found dead by `send`
                self._recover(k, self._failed.pop(k))
            if len(self._ready) >= n:
                break
            busy = np.unique(self._owner[self._in_flight]).tolist()
            now = time.perf_counter()
            wake = now + DEATH_CHECK_S  # see _take: a wait is cut in slices to notice deaths
            if deadline is not None:
                wake = min(wake, deadline)
            if self.step_timeout is not None:
                wake = min(wake, min(self._busy_since[k] for k in busy) + self.step_timeout)
            ready = wait([self.parent_pipes[k] for k in busy], max(0.0, wake - now))
            for conn in ready:
                self._recv_one(self.parent_pipes.index(conn))
            if not ready:
                self._check_busy(busy, timeout, deadline)
        batch, self._ready = self._ready[:n], self._ready[n:]
        ids = np.array([i for i, _ in batch], dtype=np.int64)
        infos: dict[str, Any] = {}
        merger = _InfoBatch(n)
        for pos, (i, info) in enumerate(batch):
            if info is not None:
                infos = merger._add_info(infos, self._info_of(i, *info), pos)
        infos["env_id"] = ids
        obs = (
            gather_batch(self.single_observation_space, self.observations, ids)
            if (is_flat_batchable(self.single_observation_space))
            else [self._obs_items[i] for i in ids]
        )
        return obs, self._rewards[ids], self._terminations[ids], self._truncations[ids], infos

    def _recv_one(self, k: int) -> None:
        """Take one reply of a `send` from worker ``k``: an env's step, or a failure."""
        try:
            msg = self._recv(k)
        except EnvWorkerError:
            if self.on_failure != "restart":
                raise
            self._note_failure(k)
            self._recover(k, self._failed.pop(k))
            return
        self._busy_since[k] = time.perf_counter()
        if msg[:1] == w.ERROR:
            index, _, type_name, text, tb = pickle.loads(msg[1:])
            if self.on_failure == "restart":
                where = f"env {index}" if index is not None else "env creation"
                self._recover(k, f"raised {type_name}: {text} (in {where}):\n{tb}")
                return
            if index is not None:
                self._in_flight[index] = False
            self._raise_remote(k, msg)
        (i,) = w._INDEX.unpack_from(msg, 1)
        info = None
        if len(msg) > 5:
            info, obs = pickle.loads(msg[5:])
            if obs is not None:
                self._set_obs(i, obs)
        self._in_flight[i] = False
        self._ready.append((i, info))

    def _check_busy(self, busy: list[int], timeout: float | None, deadline: float | None) -> None:
        """After a wait with no reply: a dead or hung worker fails; past ``timeout``, raise."""
        now = time.perf_counter()
        for k in busy:
            if not self.processes[k].is_alive():
                self._recv_one(k)  # raises, or restarts it
            elif self.step_timeout is not None and now - self._busy_since[k] >= self.step_timeout:
                reason = f"did not answer within {self.step_timeout} s (step_timeout)"
                if self.on_failure != "restart":
                    raise mp.TimeoutError(f"{self._worker_name(k)} {reason}")
                self._recover(k, reason)
        if deadline is not None and now >= deadline:
            raise mp.TimeoutError(f"The call to `recv` has timed out after {timeout} second(s).")

    def _recover(self, k: int, reason: str) -> None:
        """Restart worker ``k`` during send/recv: each of its envs comes back in a new episode.

        Envs that were stepping or waiting to be returned come back from ``recv`` with their
        new first observation; idle ones do at their next ``send``, without being stepped.
        """
        lo, hi = self.slices[k]
        infos = {i: info for i, info, _ in self._unpack(k, self._restart_worker(k, reason))}
        restarted = {i: ({**infos.get(i, {}), "env_worker_restarted": True}, False) for i in range(lo, hi)}
        self._ready = [(i, restarted.pop(i)) if lo <= i < hi else (i, x) for i, x in self._ready]
        for i, info in restarted.items():
            if self._in_flight[i]:
                self._ready.append((i, info))
            else:
                self._fresh[i] = info
        self._in_flight[lo:hi] = False

    # -- call / attributes / render ------------------------------------------------------
    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call method ``name`` (or read attribute ``name``) of every sub-environment."""
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def call_async(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Send ``call`` to the workers; :meth:`call_wait` collects the results."""
        self._assert_is_running()
        self._assert_idle("call_async")
        blob = w.CALL + pickle.dumps((name, args, kwargs))
        for k in range(self.num_workers):
            self._send(k, blob)
        self._waiting = list(range(self.num_workers))
        self._state = _State.WAITING_CALL

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        """Wait for :meth:`call_async` and return one result per env."""
        self._assert_is_running()
        if self._state != _State.WAITING_CALL:
            raise NoAsyncCallError(
                "Calling `call_wait` without any prior call to `call_async`.",
                _State.WAITING_CALL.value,
            )
        replies = self._gather(timeout, "call_wait")
        return tuple(r for k in range(self.num_workers) for r in pickle.loads(replies[k][1:]))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """The attribute ``name`` of every sub-environment."""
        return self.call(name)

    def set_attr(self, name: str, values: Any) -> None:
        """Set attribute ``name``: one value for all envs, or a list/tuple with one per env."""
        self._assert_is_running()
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(
                "Values must be a list or tuple with length equal to the number of environments. "
                f"Got `{len(values)}` values for {self.num_envs} environments."
            )
        self._assert_idle("set_attr")
        for k, (lo, hi) in enumerate(self.slices):
            self._send(k, w.SETATTR + pickle.dumps((name, list(values[lo:hi]))))
        self._waiting = list(range(self.num_workers))
        self._state = _State.WAITING_CALL
        self._gather(None, "set_attr")

    def render(self) -> tuple[Any, ...] | None:
        """The rendered frame of every sub-environment."""
        return self.call("render")

    # -- closing -------------------------------------------------------------------------
    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Stop the workers: politely (``close`` each env), or by force after ``timeout``."""
        pending = self._state != _State.DEFAULT or any(self._late) or self._in_flight.any() or self._failed
        if self._dead is None and not terminate and not pending:
            deadline = None if timeout is None else time.perf_counter() + timeout
            try:
                for k in range(self.num_workers):
                    self._send(k, w.CLOSE)
                for k in range(self.num_workers):
                    if not self._take(k, deadline):
                        break
                    if self._codes[k, 1] != w.CODE_OK:
                        self.parent_pipes[k].recv_bytes()
            except (EnvWorkerError, EOFError, OSError):
                pass
            for proc in self.processes:
                left = 5.0 if deadline is None else max(0.1, deadline - time.perf_counter())
                proc.join(timeout=left)
        _shutdown(self.processes, self.parent_pipes)
        self._finalizer.detach()
        self._state = _State.DEFAULT

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close(terminate=True)

    # -- plumbing ------------------------------------------------------------------------
    def _assert_is_running(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError(
                f"Trying to operate on `{type(self).__name__}`, after a call to `close()`."
            )
        if self._dead is not None:
            raise EnvWorkerError(self._dead)

    def _assert_idle(self, what: str) -> None:
        if self._state != _State.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `{what}` while waiting for a pending call to `{self._state.value}` to complete.",
                str(self._state.value),
            )

    def _worker_name(self, k: int) -> str:
        lo, hi = self.slices[k]
        return f"env worker {k} (envs {lo}-{hi - 1}, pid {self.processes[k].pid})"

    def _broken(self, k: int, during: str) -> EnvWorkerError:
        proc = self.processes[k]
        proc.join(timeout=1.0)
        self._dead = (
            f"{self._worker_name(k)} {w.describe_exit(proc.exitcode)} during {during}; "
            "this vector env cannot be used any more: close() it and make a new one"
        )
        self._state = _State.DEFAULT
        return EnvWorkerError(self._dead)

    def _send(self, k: int, blob: bytes) -> None:
        self._drain_late(k)
        self._codes[k, 0] = w.CODE_PIPE
        try:
            if len(blob) <= w.SMALL_MESSAGE:
                self.parent_pipes[k].send_bytes(blob)
                self._go[k].release()
            else:  # the worker reads while this writes (see _worker.SMALL_MESSAGE)
                self._go[k].release()
                self.parent_pipes[k].send_bytes(blob)
        except (BrokenPipeError, EOFError, OSError) as e:
            raise self._broken(k, "send") from e

    def _take(self, k: int, deadline: float | None) -> bool:
        """Wait for worker ``k``'s next reply token; False at the deadline.

        Semaphores do not notice a dead worker, so the wait is cut in slices and a worker
        found dead raises EnvWorkerError within ``DEATH_CHECK_S``.
        """
        done = self._done[k]
        if done.acquire(False):
            return True
        self._slowest = k
        while True:
            wait_s = DEATH_CHECK_S
            if deadline is not None:
                wait_s = min(wait_s, deadline - time.perf_counter())
                if wait_s <= 0:
                    return False
            if done.acquire(True, wait_s):
                return True
            if not self.processes[k].is_alive():
                if done.acquire(False):  # it answered just before it died
                    return True
                raise self._broken(k, self._state.value)

    def _recv(self, k: int, deadline: float | None = None) -> bytes | None:
        """The next reply of worker ``k``; None only if ``deadline`` passes first."""
        if not self._take(k, deadline):
            return None
        if self._codes[k, 1] == w.CODE_OK:
            return w.OK
        try:
            return self.parent_pipes[k].recv_bytes()
        except (EOFError, OSError, ConnectionResetError) as e:
            raise self._broken(k, self._state.value) from e

    def _drain_late(self, k: int) -> None:
        """Discard replies to commands whose wait timed out, so replies stay in order."""
        while self._late[k]:
            self._recv(k)
            self._late[k] -= 1

    def _drain_in_flight(self) -> None:
        """Collect and drop the steps started by `send` that `recv` never took.

        With on_failure="restart", a dead or hung worker is left for the reset to restart.
        """
        while self._in_flight.any():
            for k in np.unique(self._owner[self._in_flight]).tolist():
                lo, hi = self.slices[k]
                if k not in self._failed:
                    deadline = None if self.step_timeout is None else time.perf_counter() + self.step_timeout
                    try:
                        msg = self._recv(k, deadline)
                    except EnvWorkerError:
                        if self.on_failure != "restart":
                            raise
                        self._note_failure(k)
                        msg = None
                    if msg is None and k not in self._failed:
                        reason = f"did not answer within {self.step_timeout} s (step_timeout)"
                        if self.on_failure != "restart":
                            raise mp.TimeoutError(f"{self._worker_name(k)} {reason}")
                        self._failed[k] = reason
                if k in self._failed:
                    self._in_flight[lo:hi] = False
                    continue
                index = pickle.loads(msg[1:])[0] if msg[:1] == w.ERROR else w._INDEX.unpack_from(msg, 1)[0]
                if index is None:  # the whole command failed: no more replies to it
                    self._in_flight[lo:hi] = False
                else:
                    self._in_flight[index] = False

    def _gather(self, timeout: float | None, what: str) -> dict[int, bytes]:
        """Collect one reply from each waiting worker; raise remote errors after all arrive."""
        waiting = self._waiting
        replies: dict[int, bytes] = {}
        if timeout is None:
            # Wait first for the worker that finished last the previous time: when it is done
            # the others usually are too, and the parent is woken once instead of each time.
            slowest = self._slowest
            for k in sorted(waiting, key=lambda k: k != slowest):
                replies[k] = self._recv(k)
        else:
            deadline = time.perf_counter() + timeout
            for n, k in enumerate(waiting):
                msg = self._recv(k, deadline)
                if msg is None:
                    for late in waiting[n:]:
                        self._late[late] += 1
                    self._state = _State.DEFAULT
                    raise mp.TimeoutError(f"The call to `{what}` has timed out after {timeout} second(s).")
                replies[k] = msg
        self._state = _State.DEFAULT
        errors = [k for k in waiting if replies[k][:1] == w.ERROR]
        if errors:
            self._raise_remote(errors[0], replies[errors[0]])
        return replies

    def _collect(self, timeout: float | None, what: str) -> dict[str, Any]:
        """The replies to a reset or step, merged into infos; failed workers raise or restart."""
        timeout = timeout if timeout is not None else self.step_timeout
        if self.on_failure == "raise":
            return self._merge(self._gather(timeout, what))
        replies, failures = self._gather_surviving(timeout)
        infos = self._merge(replies)
        reset = self._reset_request if what == "reset_wait" else None
        for k, reason in failures.items():
            infos = self._merge({k: self._restart_worker(k, reason, reset)}, infos)
            infos = self._mark_restarted(infos, range(*self.slices[k]))
        return infos

    def _mark_restarted(self, infos: dict[str, Any], envs: Any) -> dict[str, Any]:
        for i in envs:
            infos = self._add_info(infos, {"env_worker_restarted": True}, i)
        return infos

    def _post(self, k: int, blob: bytes) -> None:
        """Send a command; with on_failure="restart", a dead worker is noted instead of raising.

        The reply collection then restarts it (``_failed``), as for a worker dying mid-step.
        """
        if k in self._failed:
            return
        try:
            self._send(k, blob)
        except EnvWorkerError:
            if self.on_failure != "restart":
                raise
            self._note_failure(k)

    def _note_failure(self, k: int) -> None:
        self._dead = None  # only this worker is lost, and it is about to be replaced
        self.processes[k].join(timeout=1.0)
        self._failed[k] = w.describe_exit(self.processes[k].exitcode)

    def _gather_surviving(self, timeout: float | None) -> tuple[dict[int, bytes], dict[int, str]]:
        """Collect the step replies; a worker that died, raised or hung is a failure, not an error."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        replies: dict[int, bytes] = {}
        failures: dict[int, str] = {}
        for k in self._waiting:
            if k in self._failed:
                failures[k] = self._failed.pop(k)
                continue
            try:
                msg = self._recv(k, deadline)
            except EnvWorkerError:
                self.processes[k].join(timeout=1.0)
                failures[k] = w.describe_exit(self.processes[k].exitcode)
                self._dead = None  # only this worker is lost, and it is about to be replaced
                continue
            if msg is None:
                failures[k] = f"did not answer within {timeout} s (step_timeout)"
            elif msg[:1] == w.ERROR:
                index, _, type_name, text, tb = pickle.loads(msg[1:])
                where = f"env {index}" if index is not None else "env creation"
                failures[k] = f"raised {type_name}: {text} (in {where}):\n{tb}"
            else:
                replies[k] = msg
        failures.update(self._failed)  # dead, though a masked reset had nothing for it
        self._failed.clear()
        self._state = _State.DEFAULT
        return replies, failures

    def _restart_worker(self, k: int, reason: str, reset: tuple[list[Any], Any, Any] | None = None) -> bytes:
        """Replace a failed worker by a new process with fresh envs, reset; return the reset's reply.

        The fresh envs are reset with ``reseed``'s seeds. When the failure happened during a
        reset, the reset that was asked for (``reset``: seeds, options, mask) follows, so the
        caller gets the observations it asked for.
        """
        name = self._worker_name(k)
        proc = self.processes[k]
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
        with contextlib.suppress(Exception):
            self.parent_pipes[k].close()
        self.worker_restarts += 1
        lo, hi = self.slices[k]
        log.warning(
            f"{name} {reason.rstrip()}\nrestarting it with fresh envs {lo}-{hi - 1} "
            f"(env worker restart {self.worker_restarts})"
        )
        # New semaphores and codes: the dead worker may have left a token or a code behind.
        self._go[k], self._done[k] = self._ctx.Semaphore(0), self._ctx.Semaphore(0)
        self._codes[k] = 0
        self._late[k] = 0
        self._start_worker(k)
        seeds = [None if self.reseed is None else self.reseed(i, self.worker_restarts) for i in range(lo, hi)]
        msg = self._reset_restarted(k, (seeds, None, None))
        if reset is not None:
            seed, options, mask = reset
            sub_mask = None if mask is None else mask[lo:hi].tolist()
            if sub_mask is None or any(sub_mask):
                msg = self._reset_restarted(k, (seed[lo:hi], options, sub_mask))
        return msg

    def _reset_restarted(self, k: int, request: tuple[Any, Any, Any]) -> bytes:
        self._send(k, w.RESET + pickle.dumps(request))
        deadline = None if self.step_timeout is None else time.perf_counter() + max(self.step_timeout, 30.0)
        msg = self._recv(k, deadline)
        if msg is None:
            raise self._broken(k, "the reset after a restart")
        if msg[:1] == w.ERROR:
            self._dead = f"{self._worker_name(k)} could not reset its new envs after a restart"
            self._raise_remote(k, msg)
        return msg

    def _raise_remote(self, k: int, msg: bytes) -> None:
        index, exc, type_name, text, tb = pickle.loads(msg[1:])
        where = f"env {index}" if index is not None else "env creation"
        if exc is None:
            exc = RuntimeError(f"{type_name}: {text}")
        if hasattr(exc, "add_note"):
            exc.add_note(f"(raised in {where}, {self._worker_name(k)})")
        raise exc from w.RemoteError(f"{where} in {self._worker_name(k)}:\n{tb}")

    def _merge(self, replies: dict[int, bytes], infos: dict[str, Any] | None = None) -> dict[str, Any]:
        """Batch infos (and pickled observations) in env order, as SyncVectorEnv does."""
        infos = {} if infos is None else infos
        for k in sorted(replies):
            for i, info, final in self._unpack(k, replies[k]):
                infos = self._add_info(infos, self._info_of(i, info, final), i)
        return infos

    def _unpack(self, k: int, msg: bytes) -> list[tuple[int, dict[str, Any], bool]]:
        """A reset or step reply of worker ``k``: store pickled observations, return the infos."""
        if msg[:1] != w.PAYLOAD:
            return []
        env_infos, obs_list = pickle.loads(msg[1:])
        if obs_list is not None:
            lo, _ = self.slices[k]
            for j, obs in enumerate(obs_list):
                self._set_obs(lo + j, obs)
        return env_infos

    def _returned_obs(self) -> Any:
        """The batch of observations, copied unless ``copy=False`` asked for the live view."""
        if self._obs_stale:  # batched as AsyncVectorEnv does, whatever the space
            self.observations = concatenate(self.single_observation_space, self._obs_items, self.observations)
            self._obs_stale = False
        if not self.copy:
            return self.observations
        obs = self.observations
        return obs.copy() if type(obs) is np.ndarray else deepcopy(obs)

    def _info_of(self, i: int, info: dict[str, Any], final: bool) -> dict[str, Any]:
        if final:  # the final observation waits in shared memory
            return {"final_obs": self._final_obs_at(i), **info}
        return info

    def _set_obs(self, i: int, obs: Any) -> None:
        """Place one pickled observation in the (non-shared) observation batch."""
        if is_flat_batchable(self.single_observation_space):
            assign_batch(
                self.single_observation_space,
                self.observations,
                _expand(self.single_observation_space, obs),
                slice(i, i + 1),
            )
        else:  # concatenated when returned: custom spaces cannot be indexed in a batch
            self._obs_items[i] = obs
            self._obs_stale = True

    def _check_spaces(self) -> None:
        blob = w.CHECK + pickle.dumps(
            (self.observation_mode, self.single_observation_space, self.single_action_space)
        )
        for k in range(self.num_workers):
            self._send(k, blob)
        self._waiting = list(range(self.num_workers))
        self._state = _State.WAITING_CALL
        replies = self._gather(None, "start-up")
        for k in range(self.num_workers):
            for i, same_obs, same_act in pickle.loads(replies[k][1:]):
                if not same_obs:
                    if self.observation_mode == "same":
                        raise RuntimeError(
                            "ProcessVectorEnv(..., observation_mode='same') however some of the "
                            f"sub-environments observation spaces are not equivalent (env {i}). "
                            "If this is intentional, use `observation_mode='different'` instead."
                        )
                    raise RuntimeError(
                        "ProcessVectorEnv(..., observation_mode='different' or custom space) "
                        "however the sub-environment's observation spaces do not share a common "
                        f"shape and dtype (env {i})."
                    )
                if not same_act:
                    raise RuntimeError(
                        f"Env {i} has an action space different from "
                        f"`{self.single_action_space}`. In order to batch actions, the action "
                        "spaces from all environments must be equal."
                    )


def _expand(space: Space, value: Any) -> Any:
    """One env's value as a batch of one."""
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        return {key: _expand(sub, value[key]) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(_expand(sub, value[j]) for j, sub in enumerate(space.spaces))
    return np.asarray(value, dtype=space.dtype)[None]


def _iterate(batched_space: Space, actions: Any, n: int) -> list[Any]:
    from gymnasium.vector.utils import iterate

    out = list(iterate(batched_space, actions))
    if len(out) != n:
        raise ValueError(f"expected actions for {n} envs, got {len(out)}")
    return out

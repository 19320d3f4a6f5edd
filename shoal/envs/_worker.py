"""The env worker: one process stepping a contiguous slice of a ProcessVectorEnv's envs.

Observations, rewards and done flags go straight into shared memory; the pipe carries one
short message per command (a tag byte), plus a pickle only for what cannot be batched in
shared memory: non-empty infos, errors, ``call`` results and custom-space observations.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium.spaces.utils import is_space_dtype_shape_equiv
from gymnasium.vector.utils import read_from_shared_memory
from gymnasium.vector.vector_env import AutoresetMode

from shoal.envs._spaces import make_reader, make_writer

# Commands, parent -> worker (first byte of the message).
STEP = b"S"  # step every env of the slice; actions are in shared memory (or pickled after)
STEP_SOME = b"A"  # step the listed envs, answering DONE for each as it finishes
RESET = b"R"
CALL = b"C"
SETATTR = b"T"
CHECK = b"V"
CLOSE = b"Q"

# Replies, worker -> parent.
OK = b"K"  # done, nothing else to say
PAYLOAD = b"P"  # done, pickled payload follows
ERROR = b"E"  # pickled (env_index, exception or None, type name, message, traceback text)
DONE = b"D"  # one env of a STEP_SOME finished: 4-byte env index, then optional pickled info

_INDEX = struct.Struct("<i")

# One-byte codes in shared memory for the hot path (see Channel).
CODE_PIPE = 0  # the message is in the pipe
CODE_STEP = 1  # parent -> worker: STEP, actions in shared memory
CODE_OK = 2  # worker -> parent: OK, no message
PARENT_POLL_S = 2.0  # how often an idle worker checks that its parent is still alive
# A message longer than this may not fit in the pipe's buffer, so its sender wakes the
# reader before writing it: writing first would block until the reader, still waiting for
# the wake-up, reads it. Shorter messages are written first and the reader never blocks.
SMALL_MESSAGE = 16 * 1024
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# After answering, a worker polls its pipe this long before sleeping in the kernel: the next
# step usually follows within microseconds, and waking a sleeping process costs ~20-50 us.
SPIN_S = 100e-6


@dataclass
class SharedBuffers:
    """Shared arrays of a ProcessVectorEnv, created by the parent before workers start."""

    num_envs: int
    obs_space: Any  # the vector env's single observation space (the buffers' layout)
    action_space: Any  # its single action space
    obs: Any  # gymnasium shared memory for observations, or None (pickled observations)
    final_obs: Any  # same layout, for SAME_STEP autoreset's final observations, or None
    actions: Any  # gymnasium shared memory for actions, or None (pickled actions)
    rewards: Any  # RawArray of float64
    terminations: Any  # RawArray of bool
    truncations: Any  # RawArray of bool


def arrays(buffers: SharedBuffers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numpy views of the reward and done-flag arrays."""
    return (
        np.frombuffer(buffers.rewards, dtype=np.float64),
        np.frombuffer(buffers.terminations, dtype=np.bool_),
        np.frombuffer(buffers.truncations, dtype=np.bool_),
    )


class RemoteError(Exception):
    """Carries an env worker's traceback text as the cause of the re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def encode_error(env_index: int | None, exc: BaseException) -> bytes:
    tb = traceback.format_exc()
    try:
        exc_blob: BaseException | None = exc
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc_blob = None
    return ERROR + pickle.dumps((env_index, exc_blob, type(exc).__name__, str(exc), tb))


class Channel:
    """The worker's end of its link to the parent.

    Messages travel through a pipe, but wake-ups go through two POSIX semaphores: ``go``
    (parent -> worker, one token per command) and ``done`` (worker -> parent, one token per
    reply). Waking a process blocked on a semaphore is markedly cheaper than waking one
    blocked on a pipe read here, and a worker can spin on ``go`` without a system call.

    The hot path skips the pipe altogether: a one-byte code in shared memory (``codes[0]``
    written by the parent, ``codes[1]`` by the worker) says "step, the actions are in shared
    memory" or "done, nothing to add". Only exclusive commands (never two outstanding) use
    these codes, so a code is always read for the message it belongs to.
    """

    def __init__(self, conn: Any, go: Any, done: Any, codes: np.ndarray, parent_pid: int) -> None:
        self.conn, self.go, self.done, self.parent_pid = conn, go, done, parent_pid
        self.first_ppid = os.getppid()  # the parent itself, or a forkserver started by it
        self.codes = codes

    def parent_alive(self) -> bool:
        return parent_alive(self.parent_pid, self.first_ppid)

    def next_command(self, spin_s: float = 0.0) -> bytes | None:
        """Block until the parent sends a command; None when the parent is gone."""
        take, clock = self.go.acquire, time.perf_counter
        got = take(False)
        if not got and spin_s > 0:
            yield_cpu = getattr(os, "sched_yield", _noop)
            spin_until = clock() + spin_s
            while not got and clock() < spin_until:
                yield_cpu()  # let the parent run here if it is waiting for a core
                got = take(False)
        while not got:
            got = take(True, PARENT_POLL_S)
            if not got and not self.parent_alive():
                return None  # orphaned: the parent died without closing us
        if self.codes[0] == CODE_STEP:
            return STEP
        try:
            return self.conn.recv_bytes()
        except (EOFError, OSError):
            return None

    def reply(self, blob: bytes) -> None:
        if blob == OK:
            self.codes[1] = CODE_OK
            self.done.release()
        elif len(blob) <= SMALL_MESSAGE:
            self.codes[1] = CODE_PIPE
            self.conn.send_bytes(blob)
            self.done.release()
        else:  # e.g. rendered frames: the parent reads while this writes (see SMALL_MESSAGE)
            self.codes[1] = CODE_PIPE
            self.done.release()
            self.conn.send_bytes(blob)


def parent_alive(parent_pid: int, first_ppid: int) -> bool:
    """False once the vector env's process is gone (the worker was re-parented, or it died)."""
    if os.getppid() != first_ppid:
        return False
    if parent_pid == first_ppid:
        return True
    try:  # started by a forkserver: ask about the vector env's process itself
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def die_with_parent(parent_pid: int, use_signal: bool) -> None:
    """Make sure this process ends with its parent, even when stuck writing to a pipe.

    A worker can block in a write that nobody will read (a large reply, a parent killed
    meanwhile), and another process inheriting the pipe (a fork) keeps that write from
    failing. Linux can send SIGKILL when the parent ends (``PR_SET_PDEATHSIG``); the signal
    follows the thread that started us, so the parent asks for it only from its main thread.
    Otherwise a watcher thread polls the parent and ends the process.
    """
    first_ppid = os.getppid()
    if use_signal and sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if not parent_alive(parent_pid, first_ppid):  # it died before prctl
                    os._exit(1)
                return

    def watch() -> None:
        while parent_alive(parent_pid, first_ppid):
            time.sleep(PARENT_POLL_S)
        time.sleep(PARENT_POLL_S)  # an idle main loop exits cleanly meanwhile (closing its envs)
        os._exit(1)

    threading.Thread(target=watch, name="shoal-parent-watch", daemon=True).start()


def _noop() -> None:
    return None


def worker_main(
    worker_index: int,
    env_fns: Any,
    start: int,
    conn: Any,
    go: Any,
    done: Any,
    codes: Any,
    buffers: SharedBuffers,
    autoreset_mode: AutoresetMode,
    parent_pid: int,
    inherited: list[Any],
    death_signal: bool,
) -> None:
    """Entry point of an env worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with_parent(parent_pid, death_signal)
    # fork copies the parent's ends of every worker's pipe, this one's included: held here,
    # they would keep a write to a dead parent from failing.
    for other in inherited:
        other.close()
    code_view = np.frombuffer(codes, dtype=np.uint8)[2 * worker_index : 2 * worker_index + 2]
    channel = Channel(conn, go, done, code_view, parent_pid)
    envs: list[Any] = []
    try:
        envs = [fn() for fn in env_fns.fn]
    except BaseException as exc:
        channel.reply(encode_error(None, exc))
        _serve_until_close(channel)
        return
    try:
        try:
            env_slice = _EnvSlice(envs, start, channel, buffers, autoreset_mode)
        except BaseException as exc:
            channel.reply(encode_error(None, exc))
            _serve_until_close(channel)
            return
        env_slice.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone: nobody to tell
    finally:
        for env in envs:
            with contextlib.suppress(Exception):
                env.close()
        conn.close()


def _serve_until_close(channel: Channel) -> None:
    """After a failed start, answer every command with an error until told to close."""
    while (msg := channel.next_command()) is not None:
        if msg[:1] == CLOSE:
            channel.reply(OK)
            return
        channel.reply(encode_error(None, RuntimeError("the env worker failed to create its envs")))


class _EnvSlice:
    """Envs ``start .. start+len(envs)`` of the vector env, stepped in this process."""

    def __init__(
        self,
        envs: list[Any],
        start: int,
        channel: Channel,
        buffers: SharedBuffers,
        autoreset_mode: AutoresetMode,
    ) -> None:
        self.envs = envs
        self.start = start
        self.channel = channel
        self.mode = autoreset_mode
        self.autoreset = [False] * len(envs)
        self.last_obs: list[Any] = [None] * len(envs)  # only used without shared memory
        n = buffers.num_envs
        self.rewards, self.terminations, self.truncations = arrays(buffers)
        obs_space = buffers.obs_space
        act_space = buffers.action_space
        self.write_obs = None
        self.write_final_obs = None
        if buffers.obs is not None:
            views = read_from_shared_memory(obs_space, buffers.obs, n=n)
            self.write_obs = make_writer(obs_space, views, buffers.obs)
        if buffers.final_obs is not None:
            views = read_from_shared_memory(obs_space, buffers.final_obs, n=n)
            self.write_final_obs = make_writer(obs_space, views, buffers.final_obs)
        self.read_action = None
        if buffers.actions is not None:
            views = read_from_shared_memory(act_space, buffers.actions, n=n)
            self.read_action = make_reader(act_space, views)

    # -- the loop -------------------------------------------------------------------------
    def serve(self) -> None:
        channel = self.channel
        handlers = {
            STEP: self._step_all,
            STEP_SOME: self._step_some,
            RESET: self._reset,
            CALL: self._call,
            SETATTR: self._setattr,
            CHECK: self._check,
        }
        while (msg := channel.next_command(SPIN_S)) is not None:
            tag = msg[:1]
            if tag == CLOSE:
                channel.reply(OK)
                return
            self._current = None
            try:
                reply = handlers[tag](msg[1:])
            except BaseException as exc:  # report everything, die of nothing
                reply = encode_error(self._current, exc)
            if reply is not None:
                channel.reply(reply)

    # -- stepping -------------------------------------------------------------------------
    def _step_one(self, k: int, action: Any) -> Any:
        """Step env ``k`` of the slice with gymnasium's autoreset semantics; return its info."""
        i = self.start + k
        self._current = i
        env = self.envs[k]
        mode = self.mode
        final = False
        if mode is AutoresetMode.NEXT_STEP and self.autoreset[k]:
            obs, info = env.reset()
            reward, terminated, truncated = 0.0, False, False
        else:  # DISABLED steps an ended env as asked, as AsyncVectorEnv does
            obs, reward, terminated, truncated, info = env.step(action)
            if mode is AutoresetMode.SAME_STEP and (terminated or truncated):
                reset_obs, reset_info = env.reset()
                if self.write_final_obs is not None:
                    self.write_final_obs(i, obs)
                    final = True
                    info = {"final_info": info, **reset_info}
                else:
                    info = {"final_info": info, "final_obs": obs, **reset_info}
                obs = reset_obs
        self.autoreset[k] = bool(terminated or truncated)
        self.rewards[i] = reward
        self.terminations[i] = terminated
        self.truncations[i] = truncated
        if self.write_obs is not None:
            self.write_obs(i, obs)
        else:
            self.last_obs[k] = obs
        return (info, final) if (info or final) else None

    def _actions(self, blob: bytes) -> Any:
        """Per-env action getter: shared memory, or a pickled list (the space, or the caller, needs it)."""
        if not blob and self.read_action is not None:
            read, start = self.read_action, self.start
            return lambda k: read(start + k)
        actions = pickle.loads(blob)
        return lambda k: actions[k]

    def _step_all(self, blob: bytes) -> bytes:
        action_of = self._actions(blob)
        infos = []
        for k in range(len(self.envs)):
            info = self._step_one(k, action_of(k))
            if info is not None:
                infos.append((self.start + k, *info))
        if self.write_obs is None:
            return PAYLOAD + pickle.dumps((infos, self.last_obs))
        if infos:
            return PAYLOAD + pickle.dumps((infos, None))
        return OK

    def _step_some(self, blob: bytes) -> None:
        """Step the listed envs one by one, telling the parent as each one finishes."""
        (count,) = _INDEX.unpack_from(blob)
        end = _INDEX.size * (count + 1)
        ids = np.frombuffer(blob[_INDEX.size : end], dtype=np.int32)
        rest = blob[end:]
        if self.read_action is not None:
            read = self.read_action
            action_of = lambda i: read(i)  # noqa: E731
        else:
            actions = pickle.loads(rest)
            action_of = lambda i: actions[i]  # noqa: E731
        reply = self.channel.reply
        for i in ids.tolist():
            try:
                info = self._step_one(i - self.start, action_of(i))
            except BaseException as exc:
                reply(encode_error(i, exc))
                continue
            head = DONE + _INDEX.pack(i)
            if info is None and self.write_obs is not None:
                reply(head)
            else:
                obs = None if self.write_obs is not None else self.last_obs[i - self.start]
                reply(head + pickle.dumps((info, obs)))
        return None

    # -- everything else ------------------------------------------------------------------
    def _reset(self, blob: bytes) -> bytes:
        seeds, options, mask = pickle.loads(blob)
        infos = []
        for k, env in enumerate(self.envs):
            if mask is not None and not mask[k]:
                continue
            i = self.start + k
            self._current = i
            obs, info = env.reset(seed=seeds[k], options=options)
            self.autoreset[k] = False
            self.rewards[i] = 0.0
            self.terminations[i] = False
            self.truncations[i] = False
            if self.write_obs is not None:
                self.write_obs(i, obs)
            else:
                self.last_obs[k] = obs
            if info:
                infos.append((i, info, False))
        if self.write_obs is None:
            return PAYLOAD + pickle.dumps((infos, self.last_obs))
        return PAYLOAD + pickle.dumps((infos, None)) if infos else OK

    def _call(self, blob: bytes) -> bytes:
        name, args, kwargs = pickle.loads(blob)
        if name in ("reset", "step", "close", "_setattr", "_check_spaces"):
            raise ValueError(f"Trying to call function `{name}` with `call`, use `{name}` directly instead.")
        results = []
        for k, env in enumerate(self.envs):
            self._current = self.start + k
            attr = env.get_wrapper_attr(name)
            results.append(attr(*args, **kwargs) if callable(attr) else attr)
        return PAYLOAD + pickle.dumps(results)

    def _setattr(self, blob: bytes) -> bytes:
        name, values = pickle.loads(blob)
        for k, env in enumerate(self.envs):
            self._current = self.start + k
            env.set_wrapper_attr(name, values[k])
        return OK

    def _check(self, blob: bytes) -> bytes:
        obs_mode, single_obs_space, single_action_space = pickle.loads(blob)
        result = []
        for k, env in enumerate(self.envs):
            if obs_mode == "same":
                same_obs = single_obs_space == env.observation_space
            else:
                same_obs = is_space_dtype_shape_equiv(single_obs_space, env.observation_space)
            result.append((self.start + k, same_obs, single_action_space == env.action_space))
        return PAYLOAD + pickle.dumps(result)


def describe_exit(exitcode: int | None) -> str:
    """'killed by SIGKILL', 'exited with code 1', ... for an error message."""
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"

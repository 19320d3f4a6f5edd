"""Faults in env workers reach the caller clearly, and no process outlives its owner."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import gymnasium as gym
import numpy as np
import psutil
import pytest
from conftest import alive, wait_gone
from envs import FailingEnv, SpaceEnv, fns
from gymnasium import spaces
from gymnasium.vector import SyncVectorEnv

from shoal.envs import EnvWorkerError, ProcessVectorEnv

pytestmark = pytest.mark.timeout(60)


def test_env_exception_in_step_names_the_env_and_keeps_traceback():
    env_fns = fns(3) + [lambda: FailingEnv(fail_at=2)]
    env = ProcessVectorEnv(env_fns, num_workers=2)
    try:
        env.reset(seed=0)
        env.step(np.zeros(4, dtype=np.int64))
        with pytest.raises(ValueError, match="step 2 exploded") as caught:
            env.step(np.zeros(4, dtype=np.int64))
        notes = " ".join(getattr(caught.value, "__notes__", []))
        assert "env 3" in notes and "env worker 1" in notes
        cause = caught.value.__cause__
        assert cause is not None  # the worker's traceback, as text
        assert "Traceback" in str(cause) and "in step" in str(cause) and "exploded" in str(cause)
        obs, *_ = env.step(np.zeros(4, dtype=np.int64))  # still usable
        assert obs.shape == (4, 3)
    finally:
        env.close()


def test_env_exception_in_reset_and_in_construction():
    env = ProcessVectorEnv([lambda: SpaceEnv(), lambda: FailingEnv(fail_in_reset=True)], num_workers=2)
    try:
        with pytest.raises(KeyError, match="reset exploded") as caught:
            env.reset(seed=0)
        assert "env 1" in " ".join(caught.value.__notes__)
    finally:
        env.close()

    def broken() -> SpaceEnv:
        raise OSError("no such simulator")

    calls = {"n": 0}

    def first_ok_then_broken() -> SpaceEnv:  # the parent builds one env to read the spaces
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("no such simulator")
        return SpaceEnv()

    with pytest.raises(OSError, match="no such simulator"):
        ProcessVectorEnv([first_ok_then_broken, broken], num_workers=2, context="fork")


def test_killed_worker_raises_promptly_instead_of_hanging():
    env = ProcessVectorEnv(fns(4), num_workers=2)
    try:
        env.reset(seed=0)
        victim = env.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(5)
        start = time.monotonic()
        with pytest.raises(EnvWorkerError, match=r"env worker 1 .*SIGKILL"):
            env.step(np.zeros(4, dtype=np.int64))
        assert time.monotonic() - start < 2.0
        with pytest.raises(EnvWorkerError):  # and it stays failed, it does not hang later
            env.step(np.zeros(4, dtype=np.int64))
    finally:
        env.close()
    assert not alive([p.pid for p in env.processes])


def test_worker_killed_mid_step():
    env = ProcessVectorEnv(fns(2, step_sleep=0.5), num_workers=2)
    try:
        env.reset(seed=0)
        env.step_async(np.zeros(2, dtype=np.int64))
        time.sleep(0.1)
        os.kill(env.processes[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EnvWorkerError, match="SIGKILL"):
            env.step_wait()
        assert time.monotonic() - start < 2.0
    finally:
        env.close()


def test_close_and_garbage_collection_stop_every_worker():
    env = ProcessVectorEnv(fns(4), num_workers=2)
    env.reset(seed=0)
    pids = [p.pid for p in env.processes]
    env.close()
    assert not wait_gone(pids, 2.0)

    env = ProcessVectorEnv(fns(4), num_workers=2)
    env.reset(seed=0)
    pids = [p.pid for p in env.processes]
    del env
    gc.collect()
    assert not wait_gone(pids, 5.0)


def test_close_with_a_call_pending_does_not_hang():
    env = ProcessVectorEnv(fns(2, step_sleep=30.0), num_workers=2)
    env.reset(seed=0)
    env.step_async(np.zeros(2, dtype=np.int64))
    pids = [p.pid for p in env.processes]
    start = time.monotonic()
    env.close()
    assert time.monotonic() - start < 10
    assert not wait_gone(pids, 5.0)


SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    import numpy as np
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's Ctrl-C, whatever pytest's is
    sys.path.insert(0, {tests!r})
    from envs import fns
    from shoal.envs import ProcessVectorEnv

    env = ProcessVectorEnv(fns(4), num_workers=2, daemon={daemon})
    env.reset(seed=0)
    print(" ".join(str(p.pid) for p in env.processes), flush=True)
    if {mode!r} == "raise":
        raise RuntimeError("the training script crashed")
    while True:
        env.step(np.zeros(4, dtype=np.int64))
        time.sleep(0.01)
    """
)


@pytest.mark.parametrize("daemon", [True, False])
@pytest.mark.parametrize("how", ["raise", "SIGINT", "SIGTERM", "SIGKILL"])
def test_no_worker_outlives_its_parent(how, daemon):
    """Crash, Ctrl-C, SIGTERM or SIGKILL of the parent: its env workers all exit."""
    tests = os.path.dirname(os.path.abspath(__file__))
    mode = "raise" if how == "raise" else "loop"
    code = SCRIPT.format(tests=tests, daemon=daemon, mode=mode)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2, proc.stderr.read()
        if how != "raise":  # a crashed parent's workers may be gone already
            assert all(psutil.pid_exists(p) for p in pids)
            time.sleep(0.3)
            proc.send_signal(getattr(signal, how))
        try:  # reading its output meanwhile: a child blocked on a full stderr pipe never exits
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the parent did not exit within 20 s of {how}; its stderr ends with:\n{err[-3000:]}")
        # Workers see a dead parent within their 2 s liveness check, or are stopped at once.
        assert not wait_gone(pids, 6.0), f"workers survived the parent's {how}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- on_failure="restart" outside step: reset, pickled actions, send/recv -----------------


def cartpoles(n: int) -> list:
    return [lambda: gym.make("CartPole-v1")] * n


def kill(env: ProcessVectorEnv, k: int) -> None:
    os.kill(env.processes[k].pid, signal.SIGKILL)
    env.processes[k].join(5)


@pytest.mark.parametrize("masked", [False, True])
def test_worker_killed_before_reset_is_restarted_and_gives_the_reset_asked_for(masked):
    """The issue's repro: a checkpoint boundary's reset(seed) after a worker died."""
    env = ProcessVectorEnv(cartpoles(4), num_workers=2, on_failure="restart")
    ref = SyncVectorEnv(cartpoles(4))
    try:
        env.reset(seed=0)
        kill(env, 0)
        options = {"reset_mask": np.array([True, False, True, True])} if masked else None
        obs, infos = env.reset(seed=1, options=options)
        assert env.worker_restarts == 1
        assert infos["_env_worker_restarted"].tolist() == [True, True, False, False]
        want, _ = ref.reset(seed=1)
        rows = [0, 2, 3] if masked else [0, 1, 2, 3]  # env 1 was reset, but not with seed 2
        np.testing.assert_array_equal(obs[rows], want[rows])
        obs, *_ = env.step(np.zeros(4, dtype=np.int64))  # usable afterwards
        assert obs.shape == (4, 4)
    finally:
        env.close()
        ref.close()


class SlowResetEnv(SpaceEnv):
    reset_sleep = 0.0

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        time.sleep(self.reset_sleep)
        return super().reset(**kwargs)


def test_worker_killed_during_reset_is_restarted():
    env = ProcessVectorEnv([SlowResetEnv] * 4, num_workers=2, on_failure="restart")
    ref = SyncVectorEnv([SlowResetEnv] * 4)
    try:
        env.reset(seed=0)
        env.set_attr("reset_sleep", [0.0, 0.0, 2.0, 2.0])
        env.reset_async(seed=3)
        time.sleep(0.3)
        kill(env, 1)
        start = time.monotonic()
        obs, infos = env.reset_wait()
        assert time.monotonic() - start < 1.5  # the fresh envs do not sleep
        assert env.worker_restarts == 1
        assert infos["_env_worker_restarted"].tolist() == [False, False, True, True]
        np.testing.assert_array_equal(obs, ref.reset(seed=3)[0])  # the seeds asked for
    finally:
        env.close()
        ref.close()


class TextActionEnv(SpaceEnv):
    """Actions gymnasium cannot batch in shared memory: they are pickled to the worker."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.action_space = spaces.Text(max_length=4)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        assert self.action_space.contains(action), f"bad action {action!r}"
        return self._obs(), float(len(action)), False, False, {}


def test_worker_killed_before_a_step_with_pickled_actions_is_restarted():
    env = ProcessVectorEnv([TextActionEnv] * 4, num_workers=2, on_failure="restart")
    try:
        env.reset(seed=0)
        kill(env, 1)
        obs, rewards, term, trunc, infos = env.step(("a", "b", "c", "d"))
        assert env.worker_restarts == 1
        assert infos["_env_worker_restarted"].tolist() == [False, False, True, True]
        assert rewards[2:].tolist() == [0.0, 0.0]
        env.step(("a", "b", "c", "d"))
    finally:
        env.close()


@pytest.mark.parametrize("when", ["before send", "during the step"])
def test_worker_killed_on_the_send_recv_path_is_restarted(when):
    env = ProcessVectorEnv(fns(4, step_sleep=0.3), num_workers=2, on_failure="restart")
    try:
        env.async_reset(seed=0)
        env.recv(batch_size=4)
        if when == "before send":
            kill(env, 0)
        env.send(np.zeros(4, dtype=np.int64))
        if when == "during the step":
            time.sleep(0.1)
            kill(env, 0)
        start = time.monotonic()
        obs, rewards, term, trunc, infos = env.recv(batch_size=4, timeout=10)
        assert time.monotonic() - start < 3
        assert env.worker_restarts == 1
        ids = infos["env_id"].tolist()
        assert sorted(ids) == [0, 1, 2, 3]
        restarted = {i for i, flag in zip(ids, infos["_env_worker_restarted"]) if flag}
        assert restarted == {0, 1}
        assert all(r == 0.0 for i, r in zip(ids, rewards) if i in restarted)
        env.send(np.zeros(4, dtype=np.int64))  # usable afterwards
        assert sorted(env.recv(batch_size=4)[-1]["env_id"].tolist()) == [0, 1, 2, 3]
    finally:
        env.close()


def test_idle_envs_of_a_worker_restarted_during_recv_come_back_at_their_next_send():
    # Worker 0's envs take 30 s a step, so the kill lands inside env 0's step: with instant
    # steps, env 0's result was sometimes back before the kill, and no restart was seen yet.
    env = ProcessVectorEnv(
        fns(2, step_sleep=30.0) + fns(2), num_workers=2, on_failure="restart", batch_size=2
    )
    try:
        env.async_reset(seed=0)
        env.recv(batch_size=4)
        env.send(np.zeros(2, dtype=np.int64), [0, 2])  # envs 1 and 3 stay idle
        kill(env, 0)
        _, rewards, *_, infos = env.recv()
        assert sorted(infos["env_id"].tolist()) == [0, 2] and env.worker_restarts == 1
        env.send(np.zeros(2, dtype=np.int64), [1, 3])
        _, rewards, *_, infos = env.recv()
        by_id = dict(zip(infos["env_id"].tolist(), infos.get("_env_worker_restarted", [False] * 2)))
        assert by_id == {1: True, 3: False}  # env 1 was reset with its worker, not stepped
    finally:
        env.close()


@pytest.mark.parametrize("on_failure", ["raise", "restart"])
def test_recv_respects_step_timeout(on_failure):
    env_fns = [lambda: SpaceEnv(step_sleep=30.0)] * 2 + fns(2)
    env = ProcessVectorEnv(env_fns, num_workers=2, on_failure=on_failure, step_timeout=0.5)
    try:
        env.async_reset(seed=0)
        env.recv(batch_size=4)
        env.send(np.zeros(4, dtype=np.int64))
        start = time.monotonic()
        if on_failure == "raise":
            with pytest.raises(mp.TimeoutError, match="step_timeout"):
                env.recv(batch_size=4)
        else:
            *_, infos = env.recv(batch_size=4)
            assert env.worker_restarts == 1
            restarted = infos["env_id"][infos["_env_worker_restarted"]]
            assert sorted(restarted.tolist()) == [0, 1]
        assert time.monotonic() - start < 3
    finally:
        env.close()


# -- large replies: render, and a worker stuck writing when its parent dies ---------------


class BigFrameEnv(SpaceEnv):
    """Frames the size of CartPole's (600x400 RGB): far more than a pipe's buffer."""

    def render(self) -> np.ndarray:
        return np.full((400, 600, 3), self.t, dtype=np.uint8)


@pytest.mark.parametrize("num_workers", [1, 3])
def test_render_of_rgb_array_envs_returns_frames(num_workers):
    env = ProcessVectorEnv([lambda: BigFrameEnv(render_mode="rgb_array")] * 3, num_workers=num_workers)
    try:
        env.reset(seed=0)
        env.step(np.zeros(3, dtype=np.int64))
        env.call_async("render")
        frames = env.call_wait(timeout=20)  # hung for good before
        assert len(frames) == 3
        assert all(f.shape == (400, 600, 3) and (f == 1).all() for f in frames)
        assert all(f.shape == (400, 600, 3) for f in env.render())
        env.set_attr("big", [np.ones(300_000)] * 3)  # large commands, the other way
        assert all(len(b) == 300_000 for b in env.get_attr("big"))
    finally:
        env.close()


STUCK_SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import sys, threading, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from envs import SpaceEnv
    from shoal.envs import ProcessVectorEnv

    class BigFrameEnv(SpaceEnv):
        def render(self):
            return np.zeros((400, 600, 3), dtype=np.uint8)

    def make():
        env = ProcessVectorEnv([lambda: BigFrameEnv(render_mode="rgb_array")] * 2, num_workers=2)
        env.reset(seed=0)
        env.call_async("render")  # never collected: each worker blocks writing its frame
        return env

    made = []
    if {in_thread!r}:  # the thread that started the workers ends before the parent does
        thread = threading.Thread(target=lambda: made.append(make()))
        thread.start()
        thread.join()
    else:
        made.append(make())
    # A forked process that keeps the pipes open: the parent's death does not close them.
    holder = mp.get_context("fork").Process(target=time.sleep, args=(300,))
    holder.start()
    print(" ".join(str(p.pid) for p in made[0].processes), holder.pid, flush=True)
    time.sleep(300)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("in_thread", [False, True])
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_workers_stuck_writing_die_with_their_parent(how, in_thread):
    tests = os.path.dirname(os.path.abspath(__file__))
    code = STUCK_SCRIPT.format(tests=tests, in_thread=in_thread)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 3, proc.stderr.read()
        workers, holder = pids[:2], pids[2]
        time.sleep(0.5)
        assert alive(workers) == workers  # blocked in their write, not dead
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=20)
        assert not wait_gone(workers, 8.0), f"workers stuck in a pipe write survived the parent's {how}"
        assert alive([holder]) == [holder]  # the pipes were held open all along
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(pids):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pids, 5.0)


def test_forkserver_workers_do_not_take_the_forkserver_for_a_dead_parent():
    """Their parent process is the forkserver: they used to exit after 2 s idle."""
    env = ProcessVectorEnv(fns(2), num_workers=2, context="forkserver")
    try:
        env.reset(seed=0)
        time.sleep(2.6)  # longer than an idle worker's parent check
        obs, *_ = env.step(np.zeros(2, dtype=np.int64))
        assert obs.shape == (2, 3)
    finally:
        env.close()

"""Faults in env workers reach the caller clearly, and no process outlives its owner."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from conftest import alive, wait_gone
from envs import FailingEnv, SpaceEnv, fns

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
    import sys, time
    import numpy as np
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
        assert all(psutil.pid_exists(p) for p in pids)
        if how != "raise":
            time.sleep(0.3)
            proc.send_signal(getattr(signal, how))
        proc.wait(timeout=20)
        # Workers see a dead parent within their 2 s liveness check, or are stopped at once.
        assert not wait_gone(pids, 6.0), f"workers survived the parent's {how}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""ProcessVectorEnv is a drop-in for gymnasium's vector envs: same results, step for step."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from envs import OBS_SPACES, SpaceEnv, TextEnv, fns
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from shoal.envs import ProcessVectorEnv


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality of observations / infos (dicts, tuples, arrays, object arrays)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray) and a.dtype == object:
        assert isinstance(b, np.ndarray) and a.shape == b.shape, where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{where}: {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_side_by_side(ours: gym.vector.VectorEnv, ref: gym.vector.VectorEnv, steps: int, seed: int = 3) -> int:
    """Step both with the same actions; compare everything; return the episodes ended."""
    assert_same(ours.reset(seed=seed), ref.reset(seed=seed), "reset")
    ref.action_space.seed(seed)
    ended = 0
    for t in range(steps):
        actions = ref.action_space.sample()
        got, want = ours.step(actions), ref.step(actions)
        assert_same(got, want, f"step {t}")
        ended += int(np.sum(want[2] | want[3]))
    return ended


@pytest.mark.parametrize("autoreset", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
@pytest.mark.parametrize("shared_memory", [True, False])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_matches_sync_vector_env(autoreset, shared_memory, num_workers):
    env_fns = fns(7, obs_space="dict", action_space="discrete")
    ours = ProcessVectorEnv(
        env_fns, shared_memory=shared_memory, autoreset_mode=autoreset, num_workers=num_workers
    )
    ref = SyncVectorEnv(env_fns, autoreset_mode=autoreset)
    try:
        assert ours.num_workers == num_workers
        assert ours.observation_space == ref.observation_space
        assert ours.action_space == ref.action_space
        assert run_side_by_side(ours, ref, steps=40) > 20  # many autoresets exercised
    finally:
        ours.close()
        ref.close()


@pytest.mark.parametrize("copy", [True, False])
def test_copy_flag(copy):
    ours = ProcessVectorEnv(fns(4), copy=copy, num_workers=2)
    try:
        first, _ = ours.reset(seed=0)
        snapshot = first.copy()
        ours.step(ours.action_space.sample())
        if copy:
            np.testing.assert_array_equal(first, snapshot)  # ours, untouched by the step
        else:
            assert not np.array_equal(first, snapshot)  # a live view of shared memory
    finally:
        ours.close()


def test_matches_sync_with_disabled_autoreset_and_reset_mask():
    env_fns = fns(5, obs_space="box_f32")
    ours = ProcessVectorEnv(env_fns, autoreset_mode=AutoresetMode.DISABLED, num_workers=2)
    ref = SyncVectorEnv(env_fns, autoreset_mode=AutoresetMode.DISABLED)
    try:
        assert_same(ours.reset(seed=1), ref.reset(seed=1))
        ref.action_space.seed(0)
        resets = 0
        for t in range(40):
            actions = ref.action_space.sample()
            got, want = ours.step(actions), ref.step(actions)
            assert_same(got, want, f"step {t}")
            done = want[2] | want[3]
            if done.any():
                resets += 1
                options = {"reset_mask": done, "note": t}
                assert_same(ours.reset(options=dict(options)), ref.reset(options=dict(options)))
        assert resets > 3
    finally:
        ours.close()
        ref.close()


@pytest.mark.parametrize("obs_space", sorted(OBS_SPACES))
def test_every_observation_space(obs_space):
    env_fns = fns(3, obs_space=obs_space)
    ours = ProcessVectorEnv(env_fns, num_workers=2, autoreset_mode=AutoresetMode.SAME_STEP)
    ref = SyncVectorEnv(env_fns, autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        run_side_by_side(ours, ref, steps=12)
    finally:
        ours.close()
        ref.close()


@pytest.mark.parametrize("action_space", ["discrete", "box", "multidiscrete", "multibinary", "dict", "tuple"])
def test_every_action_space(action_space):
    env_fns = fns(3, action_space=action_space)
    ours = ProcessVectorEnv(env_fns, num_workers=2)
    ref = SyncVectorEnv(env_fns)
    try:
        run_side_by_side(ours, ref, steps=12)
    finally:
        ours.close()
        ref.close()


def test_space_without_shared_memory_layout():
    env_fns = fns(3, cls=TextEnv)
    with pytest.raises(TypeError, match="disable `shared_memory`"):  # gymnasium's error
        ProcessVectorEnv(env_fns, num_workers=2)
    ours = ProcessVectorEnv(env_fns, shared_memory=False, num_workers=2)
    ref = SyncVectorEnv(env_fns)
    try:
        run_side_by_side(ours, ref, steps=10)
    finally:
        ours.close()
        ref.close()


def test_reset_seeds_each_env_with_seed_plus_index():
    ours = ProcessVectorEnv(fns(3), num_workers=2)
    try:
        ours.reset(seed=10)
        assert ours.np_random_seed == (10, 11, 12)
        ours.reset(seed=[5, None, 7])
        seeds = ours.np_random_seed
        assert seeds[0] == 5 and seeds[2] == 7
        with pytest.raises(ValueError, match="length must match"):
            ours.reset(seed=[1, 2])
    finally:
        ours.close()


def test_call_get_set_attr_and_render():
    ours = ProcessVectorEnv(fns(4, render_mode="rgb_array"), num_workers=3)
    ref = SyncVectorEnv(fns(4, render_mode="rgb_array"))
    try:
        for env in (ours, ref):
            env.reset(seed=0)
            env.step(np.zeros(4, dtype=np.int64))
        assert ours.call("double", 5) == ref.call("double", 5) == (11, 11, 11, 11)
        assert ours.get_attr("max_len") == (9, 9, 9, 9)
        ours.set_attr("label", "same")
        assert ours.get_attr("label") == ("same",) * 4
        ours.set_attr("label", ["a", "b", "c", "d"])
        assert ours.get_attr("label") == ("a", "b", "c", "d")
        with pytest.raises(ValueError, match="length equal"):
            ours.set_attr("label", ["a"])
        frames = ours.render()
        assert len(frames) == 4 and all(np.array_equal(f, g) for f, g in zip(frames, ref.render()))
        with pytest.raises(ValueError, match="use `step` directly"):
            ours.call("step", 0)
    finally:
        ours.close()
        ref.close()


def test_async_calls_and_gymnasium_errors():
    ours = ProcessVectorEnv(fns(3), num_workers=2)
    ours.reset_async(seed=0)
    with pytest.raises(AlreadyPendingCallError):
        ours.step_async(np.zeros(3, dtype=np.int64))
    obs, _ = ours.reset_wait()
    assert obs.shape == (3, 3)
    with pytest.raises(NoAsyncCallError):
        ours.step_wait()
    ours.step_async(np.zeros(3, dtype=np.int64))
    with pytest.raises(AlreadyPendingCallError):
        ours.step_async(np.zeros(3, dtype=np.int64))
    ours.step_wait()
    ours.call_async("double", 1)
    assert ours.call_wait() == (3, 3, 3)
    with pytest.raises(ValueError, match="reset_mask"):
        ours.reset(options={"reset_mask": np.zeros(3, dtype=bool)})
    with pytest.raises(TypeError, match="reset_mask"):
        ours.reset(options={"reset_mask": [True, True, True]})
    with pytest.raises(ValueError, match="actions for 3 envs, got 2"):
        ours.step(np.zeros(2, dtype=np.int64))
    ours.close()
    with pytest.raises(ClosedEnvironmentError):
        ours.step(np.zeros(3, dtype=np.int64))
    ours.close()  # closing twice is fine


def test_observation_mode_different_and_mismatched_spaces():
    low = [lambda g=g: gym.make("Pendulum-v1", g=g) for g in (9.81, 1.62)]
    ours = ProcessVectorEnv(low, observation_mode="different", num_workers=2)
    ref = SyncVectorEnv(low, observation_mode="different")
    try:
        assert ours.observation_space == ref.observation_space
        run_side_by_side(ours, ref, steps=5)
    finally:
        ours.close()
        ref.close()
    mixed = [lambda: SpaceEnv(obs_space="box_f32"), lambda: SpaceEnv(obs_space="discrete")]
    with pytest.raises(RuntimeError, match="observation_mode='same'"):
        ProcessVectorEnv(mixed, num_workers=2)
    mixed_actions = [lambda: SpaceEnv(action_space="discrete"), lambda: SpaceEnv(action_space="box")]
    with pytest.raises(RuntimeError, match="action space"):
        ProcessVectorEnv(mixed_actions, num_workers=2)


def test_accepts_async_vector_env_arguments():
    """Every AsyncVectorEnv constructor argument is accepted by name."""
    import inspect

    ours = set(inspect.signature(ProcessVectorEnv).parameters)
    theirs = set(inspect.signature(AsyncVectorEnv).parameters)
    assert theirs <= ours
    env = ProcessVectorEnv(
        fns(2), shared_memory=True, copy=True, context="spawn", daemon=True, max_concurrency=1
    )
    try:
        assert env.num_workers == 1  # max_concurrency bounds the envs stepping at once
        env.reset(seed=0)
        env.step(np.zeros(2, dtype=np.int64))
    finally:
        env.close()
    with pytest.raises(ValueError, match="worker"):
        ProcessVectorEnv(fns(2), worker=lambda *a: None)


@pytest.mark.timeout(30)
def test_timeout_then_results_stay_in_order():
    slow = [lambda: SpaceEnv(step_sleep=0.5), lambda: SpaceEnv()]
    ours = ProcessVectorEnv(slow, num_workers=2)
    ref = SyncVectorEnv([lambda: SpaceEnv(), lambda: SpaceEnv()])
    try:
        assert_same(ours.reset(seed=4), ref.reset(seed=4))
        actions = np.array([1, 2])
        ours.step_async(actions)
        start = time.monotonic()
        with pytest.raises(mp.TimeoutError):
            ours.step_wait(timeout=0.1)
        assert time.monotonic() - start < 0.4
        ref.step(actions)  # the step that timed out still happened in the worker
        actions = np.array([0, 1])
        assert_same(ours.step(actions), ref.step(actions), "after timeout")
    finally:
        ours.close()
        ref.close()


def test_send_recv_returns_first_finished_envs():
    """EnvPool-style async stepping: each env comes back once per send, with its id."""
    delays = [0.0, 0.0, 0.03, 0.0, 0.0, 0.03]
    env_fns = [lambda d=d: SpaceEnv(step_sleep=d) for d in delays]
    ours = ProcessVectorEnv(env_fns, num_workers=3, batch_size=2)
    solo = [SpaceEnv() for _ in delays]
    try:
        ours.async_reset(seed=0)
        for i, env in enumerate(solo):
            env.reset(seed=i)
        obs, rew, term, trunc, info = ours.recv(batch_size=6)
        assert sorted(info["env_id"].tolist()) == list(range(6))
        counts = np.zeros(6, dtype=int)
        ours.send(np.zeros(6, dtype=np.int64))
        with pytest.raises(AlreadyPendingCallError):
            ours.send(np.zeros(1, dtype=np.int64), [0])
        for _ in range(3):
            obs, rew, term, trunc, info = ours.recv()
            ids = info["env_id"]
            assert len(ids) == 2 and obs.shape == (2, 3)
            counts[ids] += 1
            for j, i in enumerate(ids):
                o, r, te, tr, _ = solo[i].step(0)
                np.testing.assert_array_equal(obs[j], o)
                assert rew[j] == r and term[j] == te and trunc[j] == tr
        assert counts.tolist() == [1] * 6
        with pytest.raises(NoAsyncCallError):
            ours.recv()
        ours.send(np.zeros(2, dtype=np.int64), [2, 5])
        obs, *_, info = ours.recv(timeout=5)
        assert sorted(info["env_id"].tolist()) == [2, 5]
        ours.send(np.zeros(1, dtype=np.int64), [1])
        ours.reset(seed=0)  # drops the step in flight and resets everything
        ours.step(np.zeros(6, dtype=np.int64))
    finally:
        ours.close()

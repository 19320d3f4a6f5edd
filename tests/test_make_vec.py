"""make_vec: seeded, reproducible vector envs, in-process or in worker processes."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium.vector import SyncVectorEnv

from shoal.envs import ProcessVectorEnv, make_vec
from shoal.envs.make import TRAINING_PROCESS_OVERHEAD_S, choose_vectorization


def trajectory(envs, steps: int = 60) -> list[np.ndarray]:
    """Observations and rewards of a fixed action sequence."""
    out = [envs.reset()[0]]
    rng = np.random.default_rng(0)
    for _ in range(steps):
        obs, rew, term, trunc, _ = envs.step(rng.integers(0, 2, envs.num_envs))
        out += [obs, rew, term, trunc]
    envs.close()
    return out


def test_same_seed_same_trajectories_whatever_the_vectorization():
    ref = trajectory(make_vec("CartPole-v1", 5, seed=7, vectorization="sync"))
    for workers in (1, 2, 3):
        got = trajectory(make_vec("CartPole-v1", 5, seed=7, vectorization="process", num_workers=workers))
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)
    other = trajectory(make_vec("CartPole-v1", 5, seed=8, vectorization="sync"))
    assert not np.array_equal(ref[0], other[0])


def test_env_i_is_seeded_with_seed_plus_i():
    import gymnasium as gym

    envs = make_vec("CartPole-v1", 3, seed=100, vectorization="sync")
    obs, _ = envs.reset()
    for i in range(3):
        single = gym.make("CartPole-v1")
        np.testing.assert_array_equal(obs[i], single.reset(seed=100 + i)[0])
    envs.close()


def test_callable_env_kwargs_and_wrappers():
    import gymnasium as gym

    def make(g: float = 10.0) -> gym.Env:
        return gym.make("Pendulum-v1", g=g)

    envs = make_vec(
        make,
        2,
        seed=0,
        vectorization="process",
        num_workers=2,
        g=1.62,
        wrappers=[gym.wrappers.RecordEpisodeStatistics],
    )
    try:
        assert isinstance(envs, ProcessVectorEnv)
        assert envs.get_attr("g") == (1.62, 1.62)
        envs.reset()
        envs.step(np.zeros((2, 1), dtype=np.float32))
    finally:
        envs.close()


def test_auto_picks_processes_only_when_they_pay_off():
    # The rule: splitting must save clearly more than a process round trip costs.
    assert choose_vectorization(5e-6, 8, 2) == "sync"  # CartPole x8: 40 us of work
    assert choose_vectorization(5e-6, 128, 2) == "process"
    assert choose_vectorization(200e-6, 8, 2) == "process"  # a heavy env
    assert choose_vectorization(200e-6, 8, 1) == "sync"  # one core: nothing to gain
    # In a training loop, waking the env workers costs more: CartPole's 8 envs stay
    # in-process even when a noisy timing makes a step look slow, heavy envs do not.
    assert choose_vectorization(15e-6, 8, 2) == "process"
    assert choose_vectorization(15e-6, 8, 2, TRAINING_PROCESS_OVERHEAD_S) == "sync"
    assert choose_vectorization(200e-6, 8, 2, TRAINING_PROCESS_OVERHEAD_S) == "process"
    envs = make_vec("shoal/HeavyCartPole-v1", 4, seed=0, num_workers=2)
    try:
        assert isinstance(envs, ProcessVectorEnv)
    finally:
        envs.close()
    cheap = make_vec("CartPole-v1", 2, seed=0, num_workers=2)
    assert isinstance(cheap, SyncVectorEnv)
    cheap.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"env": "CartPol-v1", "num_envs": 2}, "did you mean 'CartPole-v1'"),
        ({"env": "CartPole-v1", "num_envs": 0}, "num_envs must be a positive integer"),
        ({"env": "CartPole-v1", "num_envs": 2, "vectorization": "threads"}, "vectorization must be"),
        ({"env": "CartPole-v1", "num_envs": 2, "num_workers": 0}, "num_workers must be"),
    ],
)
def test_bad_input_is_refused_before_anything_starts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_vec(**kwargs)


def test_trainer_keeps_cheap_envs_in_process_when_a_step_times_slow(monkeypatch, tmp_path):
    # CartPole times at 8-15 us per step depending on noise; at 15 us the standalone rule
    # picks processes, which are slower inside training. The trainer must stay in-process.
    import shoal.envs.make as make_module
    import shoal.training.trainer as trainer_module
    from shoal.agent import make_config
    from shoal.algos import PPO

    made = []

    def recording_make_vec(*args, **kwargs):
        envs = make_vec(*args, **kwargs)
        made.append(envs)
        return envs

    monkeypatch.setattr(make_module, "_step_time", lambda factory: 15e-6)
    monkeypatch.setattr(trainer_module, "make_vec", recording_make_vec)
    config = make_config(
        "ppo", "CartPole-v1", {"total_steps": 256, "run_dir": str(tmp_path / "run"), "eval_episodes": 1}
    )
    trainer_module.Trainer(PPO, config, progress=False).train()
    assert len(made) == 1 and isinstance(made[0], SyncVectorEnv)
    standalone = make_vec("CartPole-v1", 8, seed=0, num_workers=2)  # same timing, the standalone rule
    try:
        assert isinstance(standalone, ProcessVectorEnv)
    finally:
        standalone.close()

"""Observation and reward normalisation: statistics that merge exactly, defaults by action
space, and an agent that keeps (and applies) its statistics wherever it goes."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

import shoal
from shoal.agent import make_config
from shoal.cli import main
from shoal.configio import ConfigError
from shoal.distributed.server import ParameterServer
from shoal.normalize import Normalizer, RunningMeanStd


def steps(num_envs: int, n: int = 40, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """A stream of vector steps: observations on very different scales, rewards, episode ends."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        obs = rng.normal([5.0, -300.0, 0.0], [1.0, 50.0, 1e-3], (num_envs, 3))
        rewards = rng.normal(-2.0, 3.0, num_envs)
        done = rng.random(num_envs) < 0.1
        valid = rng.random(num_envs) < 0.95
        out.append((obs, rewards, done, valid))
    return out


def fed(num_envs: int, stream, envs: slice = slice(None)) -> Normalizer:
    """A normaliser that saw ``stream`` (only the ``envs`` columns)."""
    norm = Normalizer((3,), len(range(num_envs)[envs]), obs=True, reward=True, gamma=0.99)
    for obs, rewards, done, valid in stream:
        norm.observe(obs[envs])
        norm.track(rewards[envs], done[envs], valid[envs])
    return norm


def test_running_statistics_are_those_of_all_the_data_whatever_the_chunks():
    rng = np.random.default_rng(1)
    data = rng.normal(1e3, 2.0, (1000, 2))  # a large mean: the naive sum of squares loses digits
    stats = RunningMeanStd((2,))
    for chunk in np.split(data, [1, 7, 300, 301, 999]):
        stats.update(chunk)
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.var, data.var(0), rtol=1e-9)


def test_merged_statistics_equal_those_of_one_process_that_saw_the_union():
    """Two workers of E envs each, merged (Chan et al.), are one learner of 2E envs (1e-6)."""
    E = 3
    stream = steps(2 * E)
    whole = fed(2 * E, stream)
    workers = [fed(2 * E, stream, slice(0, E)), fed(2 * E, stream, slice(E, 2 * E))]
    vectors = [w.take_fresh() for w in workers]
    for w in workers:
        w.merge(vectors)  # every worker merges everyone's, in rank order
    whole.merge([whole.take_fresh()])
    for w in workers:
        np.testing.assert_allclose(w.used_vector(), whole.used_vector(), rtol=1e-6, atol=0)
        assert w.fresh_vector()[0] == 0  # the merged data is not merged again
    assert whole.used[0].count == 40 * 2 * E
    obs = np.array([[5.0, -300.0, 0.0]])
    np.testing.assert_allclose(workers[0].obs(obs), whole.obs(obs), atol=1e-6)
    np.testing.assert_allclose(workers[1].scale(np.array([3.0])), whole.scale(np.array([3.0])), rtol=1e-6)


def test_the_parameter_server_merges_what_each_push_brings():
    E = 2
    stream = steps(2 * E, seed=4)
    whole = fed(2 * E, stream)
    whole.merge([whole.take_fresh()])
    server = ParameterServer(
        [torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)],
        2,
        normalizer=Normalizer((3,), 1, obs=True, reward=True),
    )
    halves = [stream[:25], stream[25:]]  # pushes arrive at any moment, in any order
    for part in halves:
        for k in (1, 0):
            envs = slice(k * E, (k + 1) * E)
            server.add_statistics(torch.from_numpy(fed(2 * E, part, envs).take_fresh()))
    # (the discounted returns of each env restart between the halves: compare observations only)
    got = server.statistics().numpy()
    np.testing.assert_allclose(
        got[: whole.used[0].size], whole.used_vector()[: whole.used[0].size], rtol=1e-6
    )


def test_state_is_arrays_and_json_and_round_trips():
    norm = fed(4, steps(4))
    norm.merge([norm.take_fresh()])
    norm.observe(np.ones((4, 3)))  # unmerged data is kept too
    arrays, meta = norm.state()
    json.dumps(meta)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in arrays.values())
    again = Normalizer((3,), 4, obs=True, reward=True)
    again.load(arrays, meta)
    np.testing.assert_array_equal(again.used_vector(), norm.used_vector())
    np.testing.assert_array_equal(again.fresh_vector(), norm.fresh_vector())
    with pytest.raises(ValueError, match="settings differ"):
        Normalizer((3,), 4, obs=True, reward=False).load(arrays, meta)


# -- defaults by action space ------------------------------------------------------------------


def test_defaults_by_action_space_and_normalisation():
    box = make_config("ppo", "Pendulum-v1", {}, presets=False)
    assert (box.num_envs, box.num_steps, box.num_minibatches, box.update_epochs) == (4, 512, 32, 10)
    assert (box.learning_rate, box.gamma, box.gae_lambda, box.ent_coef) == (3e-4, 0.99, 0.95, 0.0)
    assert box.normalize_obs is True and box.normalize_reward is True
    discrete = make_config("ppo", "CartPole-v1", {}, presets=False)  # vectors, discrete actions
    assert (discrete.num_envs, discrete.num_steps, discrete.num_minibatches) == (8, 256, 32)
    assert (discrete.learning_rate, discrete.ent_coef, discrete.normalize_obs) == (3e-4, 0.0, True)
    assert make_config("ppo", "CartPole-v1", {}).normalize_obs is False  # its preset: tuned without
    # an env's preset overrides the action-space defaults; the user overrides both
    preset = make_config("ppo", "Pendulum-v1", {})  # tuned without normalisation: keeps it off
    assert (preset.num_steps, preset.num_envs, preset.normalize_obs) == (1024, 4, False)
    mine = make_config("ppo", "Pendulum-v1", {"normalize_obs": True, "num_envs": 2})
    assert (mine.normalize_obs, mine.normalize_reward, mine.num_envs) == (True, False, 2)
    mine = make_config("ppo", "Pendulum-v1", {"normalize_obs": False}, presets=False)
    assert (mine.normalize_obs, mine.normalize_reward, mine.num_steps) == (False, True, 512)
    assert make_config("a2c", "Pendulum-v1", {}, presets=False).normalize_reward is True
    assert make_config("a2c", "CartPole-v1", {}, presets=False).normalize_reward is False
    assert make_config("dqn", "CartPole-v1", {}).normalize_obs is False


def test_the_command_line_resolves_them_to_values(tmp_path, monkeypatch):
    import shoal.launch

    seen = []
    result = {"mean_return": 0.0, "std_return": 0.0, "episodes": 0}
    monkeypatch.setattr(
        shoal.launch, "train", lambda algo, config, **kw: (seen.append(config), (result, "x"))[1]
    )
    box = "MountainCarContinuous-v0"  # Box actions, no preset
    assert main(["train", "ppo", "--env", box, "--run-dir", str(tmp_path)]) == 0
    assert seen[0].normalize_obs is True and seen[0].normalize_reward is True
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"normalize_obs": None, "normalize_reward": False}))  # null: by space
    assert main(["train", "ppo", "--env", box, "--config", str(cfg)]) == 0
    assert seen[1].normalize_obs is True and seen[1].normalize_reward is False


class Frames(gym.Env):
    """Pixels, with Box actions."""

    observation_space = gym.spaces.Box(0, 255, (40, 40, 3), np.uint8)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_pixels_are_never_normalised():
    agent = shoal.PPO(Frames, num_steps=8, num_minibatches=1)  # Box actions, but frames
    assert agent.config.normalize_obs is False and agent.config.normalize_reward is False
    with pytest.raises(ConfigError, match="normalize_obs is for vectors of numbers .* pixels"):
        shoal.PPO(Frames, normalize_obs=True)


# -- the statistics are part of the agent -------------------------------------------------------


def test_agent_saves_loads_and_acts_with_frozen_statistics(tmp_path, capsys):
    agent = shoal.PPO(
        "MountainCarContinuous-v0",  # Box actions, no preset: normalisation on
        total_steps=1024,
        num_steps=256,
        num_envs=2,
        eval_episodes=1,
        run_dir=str(tmp_path / "r"),
    ).learn(progress=False)
    norm = agent.algorithm.normalizer
    assert norm.used[0].count == 1024 and norm.used[1].count > 0  # every step, merged at each update
    saved = yaml.safe_load((agent.run_dir / "config.yaml").read_text())
    assert saved["normalize_obs"] is True and saved["normalize_reward"] is True  # resolved, visible
    loaded = shoal.load(agent.run_dir)
    np.testing.assert_array_equal(loaded.algorithm.normalizer.used_vector(), norm.used_vector())
    obs = np.array([[-0.5, 0.0], [0.4, -0.06]], np.float32)
    before = norm.used_vector().copy()
    # act applies the statistics: the network sees (obs - mean) / std, clipped
    stats = norm.used[0]
    seen = np.clip((obs - stats.mean) / np.sqrt(stats.var + 1e-8), -10, 10).astype(np.float32)
    with torch.no_grad():
        mean_action, _ = loaded.algorithm.net.sample(torch.from_numpy(seen), True)
    expected = np.clip(mean_action.numpy(), -1, 1)  # clipped to the Box
    np.testing.assert_allclose(loaded.act(obs), expected, atol=1e-6)
    np.testing.assert_allclose(agent.act(obs), expected, atol=1e-6)
    for _ in range(5):
        loaded.act(obs)
    np.testing.assert_array_equal(loaded.algorithm.normalizer.used_vector(), before)  # frozen
    # shoal eval: the same greedy policy, hence the run's own final evaluation
    summary = json.loads((agent.run_dir / "summary.json").read_text())
    assert main(["eval", str(agent.run_dir), "--episodes", "1"]) == 0
    assert f"{summary['mean_return']:.1f}" in capsys.readouterr().out

"""Atari end to end: the preprocessing against gymnasium's reference wrappers, uint8 frames
through the vector env and the buffers, whole-game raw scores in the logs, full-game evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ale_py")
pytest.importorskip("cv2")

import gymnasium as gym  # noqa: E402
import torch  # noqa: E402
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation  # noqa: E402

from shoal.agent import make_config  # noqa: E402
from shoal.algos import ALGORITHMS  # noqa: E402
from shoal.buffers import FrameReplayBuffer  # noqa: E402
from shoal.envs import make_vec  # noqa: E402
from shoal.envs.atari import AtariFactory, env_source, game_scores, make_atari, register_ale  # noqa: E402
from shoal.training.episodes import Episodes  # noqa: E402
from shoal.training.trainer import env_of, evaluate, spaces_of  # noqa: E402

register_ale()
DOCS = Path(__file__).parent.parent / "docs" / "atari.md"
ACTIONS = gym.spaces.Discrete(4)  # Breakout's
# 9/8 of a frame (84x84 bytes, an int64 owner, an int32 pin count), two rows of 4 int32 frame
# indices, the int64 action, the float32 return and discount (shoal.buffers.FrameReplayBuffer)
REPLAY_BYTES_PER_TRANSITION = 8_000


def reference(env_id: str) -> gym.Env:
    """gymnasium's own wrappers with the documented settings: what shoal's pipeline must equal."""
    base = gym.make(env_id, frameskip=1)
    return AtariPreprocessing(base, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True)


class RawRewards(gym.Wrapper):
    """Sums the emulator's own rewards, frame by frame, since the last reset (a spy under every
    wrapper); ``finished`` keeps the sums of the games played before."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.total, self.frames, self.finished = 0.0, 0, []

    def reset(self, **kwargs):
        if self.frames:
            self.finished.append(self.total)
        self.total, self.frames = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action):
        out = self.env.step(action)
        self.total += float(out[1])
        self.frames += 1
        return out


def spy_on_emulator(env: gym.Env) -> RawRewards:
    """Put a :class:`RawRewards` between ``env``'s AtariPreprocessing and the emulator."""
    layer = env
    while not isinstance(layer, AtariPreprocessing):
        layer = layer.env
    layer.env = RawRewards(layer.env)
    return layer.env


def test_evaluation_env_equals_gymnasium_reference_step_for_step():
    # MsPacman's action 1 is not FIRE: shoal's evaluation env is exactly the reference stack.
    ours = make_atari("ALE/MsPacman-v5", training=False)
    ref = FrameStackObservation(reference("ALE/MsPacman-v5"), 4)
    o1, _ = ours.reset(seed=3)
    o2, _ = ref.reset(seed=3)
    assert o1.shape == (4, 84, 84) and o1.dtype == np.uint8
    np.testing.assert_array_equal(o1, o2)
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(200):
        a = int(rng.integers(ours.action_space.n))
        s1, s2 = ours.step(a), ref.step(a)
        np.testing.assert_array_equal(s1[0], s2[0])
        assert s1[1:4] == s2[1:4]  # reward, terminated, truncated
        total += s2[1]
    assert total > 0  # the game was played, not stuck on a blank screen
    ours.close(), ref.close()


def test_training_env_is_the_reference_with_life_loss_fire_and_clipped_rewards():
    # Breakout: FIRE after each reset, a lost life ends the learner's episode, rewards -> sign.
    ours = make_atari("ALE/Breakout-v5", training=True)
    ref = reference("ALE/Breakout-v5")
    obs, _ = ours.reset(seed=5)
    ref.reset(seed=5)
    ref_obs, *_ = ref.step(1)  # the FIRE shoal presses at reset
    np.testing.assert_array_equal(obs[-1], ref_obs)
    rng = np.random.default_rng(1)
    lives, life_losses = 5, 0
    for _ in range(300):
        a = int(rng.integers(4))
        obs, reward, terminated, truncated, _ = ours.step(a)
        ref_obs, ref_reward, ref_terminated, ref_truncated, info = ref.step(a)
        np.testing.assert_array_equal(obs[-1], ref_obs)
        assert reward == np.sign(ref_reward)
        lost = info["lives"] < lives
        lives = info["lives"]
        assert terminated == (ref_terminated or lost) and truncated == ref_truncated
        if ref_terminated or ref_truncated:
            break
        if terminated:  # a life lost: the next episode goes on from here, with a no-op and FIRE
            life_losses += 1
            obs, _ = ours.reset()
            ref.step(0)
            ref_obs, *_ = ref.step(1)
            np.testing.assert_array_equal(obs[-1], ref_obs)
            assert (obs == obs[-1]).all()  # the frame stack starts afresh with the episode
    assert life_losses >= 2
    ours.close(), ref.close()


def test_whole_game_raw_score_is_what_episodes_log():
    # MsPacman's dots give 10 points each: the learner's clipped rewards (1 each) undercount them.
    vec = make_vec(AtariFactory("ALE/MsPacman-v5"), 1, seed=11, vectorization="sync")
    spy = spy_on_emulator(vec.envs[0])
    episodes = Episodes(1, games=True)
    vec.reset(seed=11)  # (the spy counts the reset's no-ops too: they belong to the game)
    rng = np.random.default_rng(2)
    autoreset, clipped, lives_ended = np.zeros(1, bool), 0.0, 0
    for _ in range(5_000):
        _, rewards, terminated, truncated, infos = vec.step(rng.integers(9, size=1))
        valid, ended = ~autoreset, terminated | truncated
        clipped += float(rewards[0])
        lives_ended += int(ended[0])
        episodes.step(rewards, valid, ended, game_scores(infos))  # as the training loop calls it
        autoreset = ended
        if game_scores(infos) is not None:
            break
    row = episodes.drain()
    assert lives_ended == 3  # three per-life episodes for the learner, one game logged
    assert row["episode_return"] == spy.total > clipped > 0
    assert row["episode_length"] > 100
    vec.close()


def test_episodes_of_games_log_whole_games_only():
    ep = Episodes(2, games=True)
    ep.step(np.ones(2), np.ones(2, bool), np.array([True, False]))  # a life lost: nothing logged
    assert "episode_return" not in ep.drain()
    over = (np.array([False, True]), np.array([0.0, 42.0]), np.array([0, 900]))
    ep.step(np.ones(2), np.ones(2, bool), np.array([False, True]), over)
    assert ep.drain() == {"episodes_cut": 0.0, "episode_return": 42.0, "episode_length": 900.0}


def test_evaluation_plays_whole_games_with_raw_rewards():
    made = []

    def play():
        env = make_atari("ALE/Breakout-v5", training=False)
        made.append((env, spy_on_emulator(env)))
        return env

    class AlwaysFire:  # relaunches the ball after each lost life; the paddle never moves
        def predict(self, obs):
            assert obs.shape == (1, 4, 84, 84) and obs.dtype == np.uint8
            return np.array([1])

    result = evaluate(AlwaysFire(), play, episodes=1, seed=0)
    env, spy = made[0]
    assert env.unwrapped.ale.lives() == 0 and env.unwrapped.ale.game_over()  # all five lives
    assert result["mean_return"] == spy.total


def test_config_presets_and_the_switch():
    config = make_config("ppo", "ALE/Pong-v5", {})
    assert config.atari_wrappers and (config.num_envs, config.num_steps, config.clip_coef) == (8, 128, 0.1)
    assert not config.normalize_obs and not config.normalize_reward
    assert isinstance(env_of(config), AtariFactory)
    assert spaces_of(env_of(config))[0].shape == (4, 84, 84)
    dqn = make_config("dqn", "ALE/Breakout-v5", {})
    assert (dqn.buffer_size, dqn.learning_starts, dqn.batch_size) == (100_000, 100_000, 32)
    a2c = make_config("a2c", "PongNoFrameskip-v4", {})
    assert (a2c.num_envs, a2c.vf_coef, a2c.ent_coef) == (16, 0.5, 0.01)  # RL-Zoo's 0.25 on SB3's loss
    v4 = env_of(a2c)()
    assert v4.observation_space.shape == (4, 84, 84)
    assert v4.unwrapped.ale.getFloat("repeat_action_probability") == 0.0  # v4: the id's own settings
    v4.close()
    v5 = env_of(config)()
    assert v5.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)  # sticky actions
    assert v5.unwrapped._frameskip == 1 and v5.action_space.n == 6  # skip in the wrapper; minimal set
    v5.close()
    assert make_config("dqn", "CartPole-v1", {}).buffer_size == 100_000  # its own preset
    assert make_config("ppo", "CartPole-v1", {}).clip_coef == 0.2
    raw = make_config("ppo", "ALE/Pong-v5", {"atari_wrappers": False})
    assert env_of(raw) == "ALE/Pong-v5"
    assert spaces_of(env_of(raw))[0].shape == (210, 160, 3)
    assert env_source("Pong-v4") == "Pong-v4"  # its emulator skips 2-4 frames at random: left alone


@pytest.mark.slow
def test_uint8_frames_through_process_vector_env_and_the_rollout_buffer():
    vec = make_vec(AtariFactory("ALE/Pong-v5"), 2, seed=1, vectorization="process", num_workers=2)
    try:
        obs, _ = vec.reset(seed=1)
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        obs, rewards, *_ = vec.step(np.array([0, 1]))
        assert obs.dtype == np.uint8 and rewards.shape == (2,)
        assert vec.single_observation_space.dtype == np.uint8
    finally:
        vec.close()
    config = make_config("ppo", "ALE/Pong-v5", {"num_envs": 2, "num_steps": 8})
    obs_space, action_space = spaces_of(env_of(config))
    algo = ALGORITHMS["ppo"](config, obs_space, action_space, torch.device("cpu"))
    assert algo.buffer.obs.dtype == torch.uint8 and algo.buffer.obs.shape == (8, 2, 4, 84, 84)
    algo.act(obs)
    assert algo._last[0].dtype == torch.uint8  # stored as frames, scaled only inside the network


def test_dqn_replay_costs_what_the_docs_say():
    """The preset's replay stores each frame once: its arrays' bytes are the docs' figure and
    what the start-up memory check counts."""
    config = make_config("dqn", "ALE/Breakout-v5", {})
    space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    algo = ALGORITHMS["dqn"](config, space, gym.spaces.Discrete(4), torch.device("cpu"))
    replay = algo.replay  # 800 MB of zeros, untouched: the pages are never faulted in
    assert isinstance(replay, FrameReplayBuffer) and replay.frames.dtype == np.uint8
    allocated = sum(a.nbytes for a in vars(replay).values() if isinstance(a, np.ndarray))
    assert round(allocated / config.buffer_size) == REPLAY_BYTES_PER_TRANSITION
    docs = DOCS.read_text()
    assert f"{REPLAY_BYTES_PER_TRANSITION:,} bytes per transition" in docs
    assert f"{allocated / 1e6:,.0f} MB" in docs
    need = config.memory_needed(space, ACTIONS)["buffer_size"]
    assert need == allocated  # what the start-up check counts
    del algo, replay
    # 1M transitions (the Nature paper's): 8 GB, not 56
    million = make_config("dqn", "ALE/Breakout-v5", {"buffer_size": 1_000_000})
    need = million.memory_needed(space, ACTIONS)["buffer_size"]
    assert f"{need / 1e9:.1f} GB" in docs
    # other observations keep the whole-observation replay (and its count)
    vector = million.memory_needed(gym.spaces.Box(-1, 1, (4,)), ACTIONS)["buffer_size"]
    assert vector == 1_000_000 * (2 * 16 + 16)


def test_dqn_on_frames_resumes_exactly_from_a_compact_replay(tmp_path):
    """DQN on Atari keeps a FrameReplayBuffer; a checkpoint saves its frames in use once each,
    and an interrupted, resumed run ends with the weights of the uninterrupted one."""
    from safetensors.numpy import load_file

    from shoal.run.checkpoint import latest
    from shoal.training.trainer import Trainer

    small = dict(
        num_envs=2,
        total_steps=400,
        checkpoint_every=130,
        learning_starts=100,
        train_freq=20,
        gradient_steps=2,
        batch_size=8,
        n_step=3,
        buffer_size=150,  # 400 steps of 2 envs: the ring wraps before the checkpoint resumed from
        target_update_interval=50,
        eval_episodes=1,
        vectorization="sync",
    )

    def run(name: str) -> Trainer:
        config = make_config("dqn", "ALE/Pong-v5", {**small, "run_dir": str(tmp_path / name)})
        return Trainer(ALGORITHMS["dqn"], config, progress=False)

    whole = run("whole")
    whole.train()
    assert isinstance(whole.algo.replay, FrameReplayBuffer) and whole.algo.replay.size == 150
    first = run("split")
    first.train(stop_after_checkpoints=2)
    assert first.env_steps < small["total_steps"]
    checkpoint = latest(tmp_path / "split" / "checkpoints")
    (heavy,) = Path(checkpoint).parent.glob("**/*.heavy.safetensors")
    saved = {k.rsplit("/", 1)[1]: v for k, v in load_file(heavy).items() if "/replay/" in k}
    assert sorted(saved) == ["actions", "discounts", "frames", "next_frames", "obs_frames", "returns"]
    size, frames = len(saved["actions"]), saved["frames"]
    assert size == 150 and frames.shape[1:] == (84, 84) and frames.dtype == np.uint8
    assert len(frames) < 1.1 * size + 2 * 4 * 4  # about one a transition, not 8
    resumed = run("split")
    resumed.train(resume=checkpoint)
    assert resumed.env_steps == whole.env_steps
    a, b = whole.algo.q.state_dict(), resumed.algo.q.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_short_ppo_run_on_pong_writes_its_run_dir(tmp_path, capsys):
    from shoal.agent import Agent

    run = tmp_path / "run"
    agent = Agent(
        "ppo",
        "ALE/Pong-v5",
        num_envs=2,
        num_steps=64,
        total_steps=1024,
        eval_episodes=1,
        log_every=512,
        vectorization="sync",
        run_dir=str(run),
    )
    summary = agent.learn(progress=False).summary
    assert (run / "config.yaml").exists() and "atari_wrappers: true" in (run / "config.yaml").read_text()
    assert summary["episodes"] == 1
    # A whole game of Pong ends at 21 points: an untrained policy's score is -21..21, whole points.
    assert -21 <= summary["mean_return"] <= 21 and summary["mean_return"] == int(summary["mean_return"])
    assert summary["mean_return"] < 0  # and it loses: a game, not a first point
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["env_steps"] >= 1024
    assert agent.trainer.episodes.games  # the loop logs the envs' whole games, not the learner's lives
    # shoal eval plays the same whole games (same seeds, greedy): the same score
    from shoal.cli import main

    assert main(["eval", str(run), "--episodes", "1", "--json"]) == 0
    assert (
        json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mean_return"] == summary["mean_return"]
    )


def test_impala_and_appo_actors_send_whole_game_scores():
    from shoal.actors.actor import _Carry, _fill
    from shoal.actors.ray_pool import ShoalActor
    from shoal.actors.shared import TrajectoryLayout

    vec = make_vec(AtariFactory("ALE/MsPacman-v5"), 1, seed=11, vectorization="sync")
    spy = spy_on_emulator(vec.envs[0])
    layout = TrajectoryLayout(700, 1, (4, 84, 84), "uint8", (), "int64")
    slot = {name: np.zeros(shape, dtype) for name, (shape, dtype) in layout.fields().items()}
    rng = np.random.default_rng(2)

    class RandomPolicy:
        def act(self, obs):
            a = rng.integers(9, size=1)
            return a, a, np.zeros(1, np.float32)

    config = make_config("appo", "ALE/MsPacman-v5", {"num_envs": 1})
    carry = _Carry(config)  # what an mp actor keeps; a Ray actor keeps the same:
    assert ShoalActor("appo", config, 0, 0, 0, layout).carry.episodes.games
    obs, _ = vec.reset(seed=11)
    _fill(slot, vec, RandomPolicy(), obs, carry, "raise")
    vec.close()
    assert slot["obs"].dtype == np.uint8
    lives_ended = int((slot["terminated"] | slot["truncated"]).sum())
    scores = slot["episode_return"][~np.isnan(slot["episode_return"])]
    assert lives_ended >= 3 and len(scores) == 1  # three lives for the learner, one game logged
    assert scores[0] == spy.finished[0]  # the emulator's raw points of that game
    game_end = np.flatnonzero(~np.isnan(slot["episode_return"]))[0]
    assert scores[0] > slot["rewards"][: game_end + 1].sum() > 0  # more than the clipped rewards

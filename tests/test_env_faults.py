"""Env faults during training: a raising, hung or killed env is restarted and training goes on."""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.envs import ProcessVectorEnv, make_vec
from shoal.envs.make import restart_seed
from shoal.training.trainer import RestartLimitError, Trainer
from tests.envs import SpaceEnv, TriggeredCartPole, fns


def env_workers() -> list[mp.Process]:
    return sorted(
        (p for p in mp.active_children() if p.name.startswith("shoal-env-worker")), key=lambda p: p.name
    )


def test_killed_env_worker_is_restarted_with_reseeded_envs():
    def run() -> list[np.ndarray]:
        envs = ProcessVectorEnv(
            fns(4, SpaceEnv, max_len=50), num_workers=2, on_failure="restart", reseed=lambda i, n: 100 * n + i
        )
        try:
            envs.reset(seed=0)
            out = []
            for t in range(6):
                if t == 3:
                    victim = envs.processes[1]
                    os.kill(victim.pid, signal.SIGKILL)
                    victim.join()
                obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
                out.append(obs.copy())
                if t == 3:
                    assert infos["_env_worker_restarted"].tolist() == [False, False, True, True]
                    assert rewards[2:].tolist() == [0.0, 0.0] and not (terminated | truncated)[2:].any()
                    assert envs.processes[1].pid != victim.pid and envs.processes[1].is_alive()
                    assert envs.worker_restarts == 1
                else:
                    assert "env_worker_restarted" not in infos
            return out
        finally:
            envs.close()

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):  # actions are sampled, obs of envs 2-3 after
        np.testing.assert_array_equal(a[3][2:], b[3][2:])  # the restart come from reseed: equal


@pytest.mark.slow
def test_hung_env_worker_is_killed_after_step_timeout_and_restarted(tmp_path):
    trigger = tmp_path / "hang"
    envs = make_vec(
        functools.partial(TriggeredCartPole, str(trigger), "hang"),
        4,
        seed=1,
        vectorization="process",
        num_workers=2,
        on_error="restart",
        step_timeout=1.0,
    )
    try:
        envs.reset()
        trigger.touch()
        start = time.perf_counter()
        _, _, _, _, infos = envs.step(np.zeros(4, dtype=np.int64))
        took = time.perf_counter() - start
        assert 1.0 <= took < 10.0
        assert infos["_env_worker_restarted"].sum() == 2  # the hung env's worker, both its envs
        assert envs.worker_restarts == 1
        envs.step(np.zeros(4, dtype=np.int64))  # and it steps on
    finally:
        envs.close()


@pytest.mark.parametrize("vectorization", ["sync", "process"])
def test_env_that_raises_is_restarted_alone(tmp_path, vectorization):
    trigger = tmp_path / "raise"
    envs = make_vec(
        functools.partial(TriggeredCartPole, str(trigger), "raise"),
        4,
        seed=3,
        vectorization=vectorization,
        num_workers=2,
        on_error="restart",
    )
    try:
        envs.reset()
        trigger.touch()
        obs, rewards, terminated, truncated, infos = envs.step(np.zeros(4, dtype=np.int64))
        restarted = infos["_env_restarted"]
        assert restarted.sum() == 1  # one env took the trigger; the other three stepped on
        i = int(np.flatnonzero(restarted)[0])
        assert rewards[i] == 0.0 and not terminated[i] and not truncated[i]
        assert rewards[~restarted].tolist() == [1.0, 1.0, 1.0]
        # The new env was reset with the seed fixed by the run seed and the restart count.
        expected, _ = TriggeredCartPole(str(trigger)).reset(seed=restart_seed(3, i, 1))
        np.testing.assert_array_equal(obs[i], expected)
    finally:
        envs.close()


def test_on_error_raise_keeps_the_env_index_and_traceback(tmp_path):
    trigger = tmp_path / "raise"
    envs = make_vec(
        functools.partial(TriggeredCartPole, str(trigger), "raise"), 2, seed=0, vectorization="process"
    )
    try:
        envs.reset()
        trigger.touch()
        with pytest.raises(RuntimeError, match="injected fault") as info:
            envs.step(np.zeros(2, dtype=np.int64))
        assert "raised in env" in str(info.value.__notes__)
        assert "TriggeredCartPole" in str(info.value.__cause__) or "step" in str(info.value.__cause__)
    finally:
        envs.close()


def ppo(tmp_path, name: str, env_fn, **overrides) -> Trainer:
    config = make_config(
        "ppo",
        "CartPole-v1",
        {
            "num_envs": 4,
            "num_steps": 32,
            "total_steps": 3072,
            "update_epochs": 2,
            "vectorization": "process",
            "env_workers": 2,
            "eval_episodes": 1,
            "log_every": 128,
            "run_dir": str(tmp_path / name),
            **overrides,
        },
    )
    return Trainer(ALGORITHMS["ppo"], config, env_fn=env_fn, progress=False)


def kill_env_worker_at(update: int, worker: int = 0):
    def on_update(trainer: Trainer) -> bool:
        if trainer.algo.updates == update:
            victim = env_workers()[worker]
            os.kill(victim.pid, signal.SIGKILL)
        return False

    return on_update


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_goes_on_after_an_env_worker_is_killed_and_is_reproducible(tmp_path):
    env_fn = functools.partial(TriggeredCartPole, str(tmp_path / "unused"))
    runs = []
    for name in ("a", "b"):
        trainer = ppo(tmp_path, name, env_fn, checkpoint_every=10**6)  # the kill lands mid-rollout
        summary = trainer.train(on_update=kill_env_worker_at(3))
        assert summary["env_steps"] >= 3072
        rows = metrics(tmp_path / name)
        assert rows[-1]["env_worker_restarts"] == 1.0 and rows[-1]["env_restarts"] == 0.0
        runs.append({k: v.clone() for k, v in trainer.algo.net.state_dict().items()})
    for key in runs[0]:  # the restarted envs are reseeded from the run seed: same run twice
        assert torch.equal(runs[0][key], runs[1][key]), key


@pytest.mark.slow
def test_env_errors_past_max_restarts_stop_the_run_with_a_checkpoint(tmp_path):
    trigger = tmp_path / "always"
    env_fn = functools.partial(TriggeredCartPole, str(trigger), "always")
    trainer = ppo(tmp_path, "run", env_fn, max_restarts=3, vectorization="sync")

    def start_failing(t: Trainer) -> bool:
        if t.algo.updates == 2:
            trigger.touch()
        return False

    with pytest.raises(RestartLimitError, match=r"more than --max-restarts 3.*checkpoint saved to"):
        trainer.train(on_update=start_failing)
    saved = sorted((tmp_path / "run" / "checkpoints").glob("*.json"))
    assert saved, "no checkpoint was saved before stopping"


@pytest.mark.slow
def test_dqn_stopped_by_the_restart_limit_can_be_resumed(tmp_path):
    # One env fails at a time, so the other holds unfinished n-step transitions at the stop.
    trigger = tmp_path / "once"
    env_fn = functools.partial(TriggeredCartPole, str(trigger), "raise")
    config = make_config(
        "dqn",
        "CartPole-v1",
        {"num_envs": 2, "total_steps": 3000, "learning_starts": 200, "train_freq": 10, "n_step": 3,
         "gradient_steps": 1,  # (the CartPole preset's 128 per phase: 38k steps nobody looks at)
         "buffer_size": 3000, "max_restarts": 2, "eval_episodes": 1, "run_dir": str(tmp_path / "run"),
         "vectorization": "sync"},
    )  # fmt: skip

    def fail_now_and_then(t: Trainer) -> bool:
        if t.env_steps >= 600:
            trigger.touch()  # one env takes it at the next step
        return False

    with pytest.raises(RestartLimitError):
        Trainer(ALGORITHMS["dqn"], config, env_fn=env_fn, progress=False).train(on_update=fail_now_and_then)
    trigger.unlink(missing_ok=True)
    from shoal.run.checkpoint import latest

    resumed = Trainer(ALGORITHMS["dqn"], config, env_fn=env_fn, progress=False)
    summary = resumed.train(resume=latest(tmp_path / "run" / "checkpoints"))
    assert summary["env_steps"] >= 3000


def test_a_cut_episode_is_a_truncation_bootstrapped_from_its_last_observation():
    from shoal.buffers import RolloutBuffer, gae

    buf = RolloutBuffer(3, 2, (1,), torch.float32, (), torch.long, torch.device("cpu"))
    values = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    for t in range(3):
        if t == 2:  # env 1 failed during step 2 and was restarted: its episode ended at step 1
            buf.truncate(np.array([False, True]))
        valid = np.array([True, t != 2])
        buf.add(
            torch.zeros(2, 1),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2),
            values[t],
            np.ones(2),
            np.zeros(2, bool),
            np.zeros(2, bool),
            valid,
        )
    adv = gae(buf.rewards, buf.values, torch.tensor([6.0, 6.0]), buf.terminated, buf.done, 0.5, 1.0)
    # Env 1, step 1: reward 1 + 0.5 * V(obs of step 2) - V(obs of step 1), nothing from step 2.
    assert adv[1, 1].item() == pytest.approx(1 + 0.5 * 3.0 - 2.0)
    assert adv[1, 0].item() != pytest.approx(adv[1, 1].item())  # env 0's episode goes on


def test_dqn_drops_the_unfinished_n_step_transitions_of_a_cut_episode():
    from shoal.buffers import ReplayBuffer

    buf = ReplayBuffer(10, 2, (1,), np.float32, (), np.int64, 3, 0.9)
    for _ in range(2):
        buf.add(
            np.zeros((2, 1)),
            np.zeros(2),
            np.ones(2),
            np.ones((2, 1)),
            np.zeros(2, bool),
            np.zeros(2, bool),
            np.ones(2, bool),
        )
    buf.clear_pending(np.array([True, False]))
    assert [len(q) for q in buf.pending] == [0, 2] and buf.size == 0


@pytest.mark.slow
@pytest.mark.parametrize("vectorization", ["sync", "process"])
def test_an_env_whose_reset_always_raises_stops_the_run_in_one_line(tmp_path, vectorization):
    code = (
        "import sys, gymnasium as gym; "
        "gym.register('shoal-test/ResetFails-v0', entry_point='tests.envs:FailingEnv', "
        "kwargs={'fail_in_reset': True}); "
        "from shoal.cli import main; sys.exit(main())"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code, "train", "ppo", "--env", "shoal-test/ResetFails-v0", "--quiet"]
        + ["--vectorization", vectorization, "--total-steps", "2000", "--run-dir", str(tmp_path / "run")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("shoal: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "made anew it raised KeyError in reset at once" in errors[0]

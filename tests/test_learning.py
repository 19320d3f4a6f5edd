"""Learning actually works: each algorithm solves CartPole-v1 from the CLI with shoal's defaults.

The seed is fixed in advance (1) and never tuned per algorithm; the README reports how
many of seeds 1-5 solve with the same defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # learning and multi-process runs: not in the quick tier

SEED = "1"


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("algo", "budget"), [("ppo", 100_000), ("dqn", 100_000), ("a2c", 500_000)])
def test_solves_cartpole_within_budget(algo, budget, tmp_path):
    run_dir = tmp_path / algo
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "train",
            algo,
            "--env",
            "CartPole-v1",
            "--seed",
            SEED,
            "--run-dir",
            str(run_dir),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=590,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] <= budget
    assert summary["episodes"] >= 10
    assert summary["mean_return"] >= 475, summary


@pytest.mark.timeout(600)
def test_ppo_continuous_defaults_learn_pendulum_without_a_preset(tmp_path):
    """Box actions get the continuous-control defaults (4 envs x 512 steps, 32 minibatches x
    10 epochs, lr 3e-4, normalised observations and rewards): with no preset, PPO learns
    Pendulum-v1 within the budget of its preset (200k steps). Seed 1, chosen before any run."""
    import shoal
    from shoal.agent import make_config

    overrides = {"seed": int(SEED), "total_steps": 200_000, "run_dir": str(tmp_path / "run")}
    config = make_config("ppo", "Pendulum-v1", overrides, presets=False)
    assert (config.num_steps, config.normalize_obs, config.normalize_reward) == (512, True, True)
    agent = shoal.Agent("ppo", "Pendulum-v1", config=config).learn(progress=False)
    assert agent.summary["mean_return"] >= -250, agent.summary

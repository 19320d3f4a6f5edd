"""APPO and IMPALA learn, from the CLI with their presets and 2 mp actors (the default).

The seed (7) was chosen before any run of these checks; the presets were tuned on other
seeds. docs/distributed.md reports the returns and times measured, and other seeds.

APPO's checks take the final policy. IMPALA's asserts less, because IMPALA with its preset
does not reliably solve CartPole: its unclipped policy gradient reaches 500 and dips again
(500 -> ~200 -> 500), and on seed 7 one run in three plateaued near 300 for 500k steps
(periodic greedy evaluations of 20 episodes; docs/distributed.md). What the check holds
is that it learns: its best periodic evaluation (20 episodes, as SB3's ``EvalCallback``
keeps ``best_model``) reaches 300 within 200k steps, and ``shoal eval --best`` scores the
policy kept on disk at 300 or more on 20 fresh episodes (a random policy scores ~20). Measured
beside other runs: best 481.1, 482.2, 382.6 on seed 7, 500.0, 500.0 on seeds 1, 2; their
re-evaluations 481.6, 482.2, 420.2, 500.0, 500.0.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SEED = "7"


# APPO on Pendulum-v1 (200k steps, >= -250: -179.3 on seed 7, docs/distributed.md) left CI in
# session 12 for its time (115-170 s of three processes); its actors and V-trace are the ones
# CartPole checks, its Gaussian policy PPO's (tests/test_learning.py).
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("algo", "env", "budget", "threshold"),
    [("appo", "CartPole-v1", 100_000, 475)],
)
def test_learns_with_two_actors(algo, env, budget, threshold, tmp_path):
    run_dir = tmp_path / algo
    argv = ["train", algo, "--env", env, "--seed", SEED, "--run-dir", str(run_dir), "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", *argv], capture_output=True, text=True, timeout=590
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    assert "num_actors: 2" in config and "backend: mp" in config
    assert budget <= summary["env_steps"] <= budget + 4 * 2048  # (the last slots may overshoot)
    assert summary["trajectories_consistent"] is True
    assert summary["episodes"] == 20
    assert summary["mean_return"] >= threshold, summary


@pytest.mark.timeout(600)
def test_impala_learns_cartpole_with_two_actors_and_keeps_its_best_policy(tmp_path):
    run_dir = tmp_path / "impala"
    argv = ["train", "impala", "--env", "CartPole-v1", "--seed", SEED, "--run-dir", str(run_dir)]
    every = ["--total-steps", "200000", "--eval-every", "25000", "--periodic-eval-episodes", "20"]
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", *argv, "--quiet", *every],
        capture_output=True,
        text=True,
        timeout=590,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trajectories_consistent"] is True
    assert summary["env_steps"] >= 200_000 and summary["best_eval_env_steps"] > 0
    assert summary["best_eval_return"] >= 300, summary
    best = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "eval", str(run_dir), "--best", "--episodes", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["mean_return"] >= 300, (best.stdout, summary)

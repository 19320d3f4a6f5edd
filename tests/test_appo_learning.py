"""APPO and IMPALA learn, from the CLI with their presets and 2 mp actors (the default).

The seed (7) was chosen before any run of these checks. APPO's presets were tuned on other
seeds, except its CartPole V-trace lambda 0.9 (session 15), screened for time to 475 on seeds
1-10 and then run 20 times on seed 7 (final 500.0 in 20 of 20; seeds 1-6 and 8-16 500.0 too);
IMPALA's CartPole preset (sessions 13 and 14) on seeds 1-8 and 7 repeated, and checked
on 9-16. docs/distributed.md reports the returns and times measured, and other seeds.

APPO's checks take the final policy. IMPALA's takes the policy its preset keeps (the best
of its periodic evaluations, 20 episodes every 25k steps, as SB3's ``EvalCallback`` keeps
``best_model``), re-evaluated by ``shoal eval --best`` on 20 fresh episodes: its unclipped
policy gradient still dips after reaching 500, so the final policy is not always the best.
Measured with the session-14 preset (2 passes over each batch; docs/distributed.md): the
kept policy re-evaluated at >= 475 in 29 runs of 29, seed 7 14 times (the lowest 487.9),
seeds 1-6 and 8-16 once each; the final policy in 23 of 29. With one pass, the kept policy
missed in 1 CI run of 3 (467.0) and 1 of 6 runs of seed 7.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SEED = "7"


def train_with_its_presets(algo: str, env: str, run_dir: Path) -> tuple[dict, str]:
    """``shoal train ALGO --env ENV`` on the seed, as a user runs it: 2 mp actors, presets."""
    argv = ["train", algo, "--env", env, "--seed", SEED, "--run-dir", str(run_dir), "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", *argv], capture_output=True, text=True, timeout=590
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    assert "num_actors: 2" in config and "backend: mp" in config
    assert summary["trajectories_consistent"] is True
    return summary, config


# APPO on Pendulum-v1 left CI in session 12 for its time (115-170 s of three processes, when
# CI took 30-31 min) and is back since session 14 (CI 23 min): seed 7 scored -197.1 in 4 runs
# of 4, two at a time, 83-94 s each.
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("algo", "env", "budget", "threshold"),
    [("appo", "CartPole-v1", 100_000, 475), ("appo", "Pendulum-v1", 200_000, -250)],
)
def test_learns_with_two_actors(algo, env, budget, threshold, tmp_path):
    summary, _ = train_with_its_presets(algo, env, tmp_path / algo)
    assert budget <= summary["env_steps"] <= budget + 4 * 2048  # (the last slots may overshoot)
    assert summary["episodes"] == 20
    assert summary["mean_return"] >= threshold, summary


@pytest.mark.timeout(600)
def test_impala_solves_cartpole_with_two_actors_and_keeps_its_best_policy(tmp_path):
    run_dir = tmp_path / "impala"
    summary, config = train_with_its_presets("impala", "CartPole-v1", run_dir)
    assert "eval_every: 25000" in config
    assert summary["env_steps"] >= 300_000 and summary["best_eval_env_steps"] > 0
    assert summary["best_eval_return"] >= 300, summary  # (the preset's 20 runs: 455.8-500.0)
    best = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "eval", str(run_dir), "--best", "--episodes", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["mean_return"] >= 475, (best.stdout, summary)

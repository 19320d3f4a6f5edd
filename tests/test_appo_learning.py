"""APPO learns, from the CLI with its presets and 2 mp actors (the default).

The seed (7) was chosen before any run of these checks; the presets were tuned on seed 1.
docs/distributed.md reports the returns and times measured, and seeds 8 and 9. IMPALA's
CartPole check is not here: its runs are not repeatable (actor timing) and one full CI run
ended at 135.5 on seed 7 at 600k steps, so it is not yet a check that holds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]

SEED = "7"


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("algo", "env", "budget", "threshold"),
    [
        ("appo", "CartPole-v1", 100_000, 475),
        ("appo", "Pendulum-v1", 200_000, -250),
    ],
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

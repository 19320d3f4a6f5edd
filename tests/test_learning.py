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

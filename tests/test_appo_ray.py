"""APPO with its actors as Ray actors (``--backend ray``): spread over the nodes of a cluster,
every trajectory received once, learning; a lost actor stops the run in one line with a
checkpoint, as Ctrl-C does, and the Ray the run started is gone with it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_appo import check_counts
from test_shutdown import finish, session_ends

from shoal.actors.ray_pool import EXIT_VARIABLE
from shoal.run import checkpoint as ckpt

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("processes")]  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]


def train_appo(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``shoal train appo`` on CartPole with Ray actors, in a session of its own."""
    argv = ["train", "appo", "--env", "CartPole-v1", "--backend", "ray", "--num-actors", "2"]
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", *argv, "--run-dir", str(run_dir), "--quiet", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.timeout(300)
def test_two_node_cluster_spreads_the_actors_and_appo_learns(tmp_path):
    """Two Ray nodes on loopback with one CPU each: one actor on each, nothing lost, learning."""
    from ray.cluster_utils import Cluster

    ours = signal.getsignal(signal.SIGTERM)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        node_ids = {node.node_id for node in cluster.list_all_nodes()}
        assert len(node_ids) == 2
        run_dir = tmp_path / "run"
        proc = train_appo(
            run_dir, "--ray-address", cluster.address, "--total-steps", "40000", "--eval-episodes", "2"
        )
        err = finish(proc, timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert not session_ends(proc.pid, grace=10), "processes of the run outlived it"
    finally:
        cluster.shutdown()
        signal.signal(signal.SIGTERM, ours)  # the cluster's head installs its own
    summary = json.loads((run_dir / "summary.json").read_text())
    check_counts(summary)
    assert set(summary["actor_nodes"].values()) == node_ids, summary  # one actor on each node
    assert summary["env_steps"] >= 40000
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    returns = [r["episode_return"] for r in rows if "episode_return" in r]
    assert np.mean(returns[-3:]) > 2 * returns[0], returns  # it is learning
    assert all(r["policy_lag_max"] <= 20 for r in rows if "policy_lag_max" in r)


@pytest.mark.timeout(300)
def test_a_lost_ray_actor_ends_the_run_in_one_line_with_a_checkpoint_and_no_ray_left(tmp_path):
    """Actor 1 exits (``os._exit``) after sending its 5th trajectory; the run's own local Ray
    is shut down with it."""
    run_dir = tmp_path / "run"
    proc = train_appo(run_dir, "--total-steps", str(10**7), env={EXIT_VARIABLE: "1:5"})
    err = finish(proc, timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("shoal: error:")]
    assert len(errors) == 1, err
    assert re.fullmatch(
        r"shoal: error: actor 1 died \(its Ray actor was lost\); the run stopped,"
        r" resume it from checkpoint \S+",
        errors[0],
    ), errors
    _, meta = ckpt.load(ckpt.latest(run_dir / "checkpoints"))  # whole, resumable
    assert meta["env_steps"] >= 5 * 32 * 8  # at least actor 1's five trajectories (preset: 32 x 8 envs)
    assert not session_ends(proc.pid, grace=15), "processes of the run (Ray's among them) outlived it"


@pytest.mark.timeout(300)
def test_ctrl_c_saves_a_checkpoint_and_leaves_no_ray_process(tmp_path):
    """As a terminal's Ctrl-C: the whole process group gets SIGINT, Ray's processes too."""
    run_dir = tmp_path / "run"
    proc = train_appo(run_dir, "--total-steps", str(10**7), "--log-every", "500")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run logged no metrics: {finish(proc)[-3000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err
    assert f"resume with: shoal train appo --resume {run_dir}" in err, err
    assert ckpt.load(ckpt.latest(run_dir / "checkpoints"))[1]["env_steps"] > 0
    assert not session_ends(proc.pid, grace=15), "processes of the run (Ray's among them) outlived it"

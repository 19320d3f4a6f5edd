"""APPO with its actors as Ray actors (``--backend ray``): spread over the nodes of a cluster,
every trajectory received once, learning, a lost actor replaced; with no replacement
allowed, a lost actor stops the run in one line with a checkpoint, as Ctrl-C does, and the
Ray the run started is gone with it."""

from __future__ import annotations

import dataclasses
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

from shoal.run import checkpoint as ckpt
from shoal.training.callbacks import FAULTS_VARIABLE

pytestmark = pytest.mark.slow

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


def actor_faults(tmp_path: Path, sig: str, actor: int, after: int) -> dict[str, str]:
    """The environment that has ``actor`` send itself ``sig`` after its ``after``-th trajectory."""
    claims = tmp_path / "claims"
    claims.mkdir()
    faults = [{"at_trajectories": after, "signal": sig, "ranks": [actor]}]
    return {FAULTS_VARIABLE: json.dumps({"dir": str(claims), "faults": faults})}


@pytest.mark.timeout(300)
def test_two_node_cluster_spreads_the_actors_replaces_a_lost_one_and_appo_learns(tmp_path):
    """Two Ray nodes on loopback with one CPU each: one actor on each; actor 1 is SIGKILLed after
    its 5th trajectory and a new one takes its place (on the node with room); nothing lost, learning."""
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
            run_dir,
            *("--ray-address", cluster.address, "--total-steps", "40000", "--eval-episodes", "2"),
            env=actor_faults(tmp_path, "SIGKILL", actor=1, after=5),
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
    assert summary["actors_replaced"] == 1, summary
    assert re.search(
        r"^shoal: actor 1 died \(its Ray actor was lost\); a new actor 1 takes its place", err, re.M
    ), err[-3000:]
    assert summary["env_steps"] >= 40000
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    returns = [r["episode_return"] for r in rows if "episode_return" in r]
    assert np.mean(returns[-3:]) > 2 * returns[0], returns  # it is learning
    assert all(r["policy_lag_max"] <= 20 for r in rows if "policy_lag_max" in r)


@pytest.mark.timeout(300)
def test_a_lost_ray_actor_ends_the_run_in_one_line_with_a_checkpoint_and_no_ray_left(tmp_path):
    """With no replacement allowed, actor 1 is SIGKILLed after sending its 5th trajectory;
    the run's own local Ray is shut down with it."""
    run_dir = tmp_path / "run"
    faults = actor_faults(tmp_path, "SIGKILL", actor=1, after=5)
    proc = train_appo(run_dir, "--total-steps", str(10**7), "--max-restarts", "0", env=faults)
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
def test_a_stopped_ray_actor_is_ended_by_the_hang_timeout_and_replaced(tmp_path):
    """Actor 0 SIGSTOPs itself after its 5th trajectory: Ray still sees a live process, so
    only the learner's silence check can tell; the frozen actor is killed (no stopped process
    outlives the run), a new one takes its place, and nothing it had sent is lost.

    Its --hang-timeout is 6 s, with 100k steps so that the run outlasts it: with 3 s (and 40k
    steps), one CI run (2 cores shared with the other xdist worker's test and Ray's own
    processes) replaced 2 actors, the stopped one and one more; with 10 s and 40k, the run
    ended before the silence was found."""
    run_dir = tmp_path / "run"
    args = ("--total-steps", "100000", "--eval-episodes", "2", "--hang-timeout", "6")
    proc = train_appo(run_dir, *args, env=actor_faults(tmp_path, "SIGSTOP", actor=0, after=5))
    err = finish(proc, timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert not session_ends(proc.pid, grace=15), "processes of the run (the stopped actor too) outlived it"
    assert len(list((tmp_path / "claims").iterdir())) == 1  # it fired once: not in the replacement
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["actors_replaced"] == 1, (summary, err[-3000:])
    assert summary["env_steps"] >= 100_000
    check_counts(summary)
    assert re.search(
        r"^shoal: actor 0 sent nothing for 6 s \(stopped or stuck; --hang-timeout\)", err, re.M
    ), err[-3000:]


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


def _pool_config(**overrides):
    from shoal.agent import make_config

    values = dict(num_envs=4, rollout_length=16, num_actors=2, slots_per_actor=2, seed=3, backend="ray")
    return make_config("appo", "CartPole-v1", {**values, **overrides}, presets=False)


@pytest.mark.timeout(300)
def test_ray_pool_every_trajectory_once_in_order_with_backpressure_and_one_line_failures():
    """The pool alone, on one local Ray: a slow learner that publishes as it reads gets every
    trajectory once, each actor's in order, with versions that were published and never go
    back; no actor runs more than ``slots_per_actor`` trajectories ahead of the learner.
    Then an actor that raises, and one that cannot start, each fail the learner in one line."""
    import ray
    import torch

    from shoal.actors.actor import policy_vector
    from shoal.actors.pool import ActorFailed
    from shoal.actors.ray_pool import RayActors
    from shoal.actors.shared import TrajectoryLayout
    from shoal.algos import ALGORITHMS
    from shoal.launch.ray_backend import ray_start
    from shoal.training.trainer import spaces_of

    config = _pool_config()
    obs_space, action_space = spaces_of(config.env)
    algo = ALGORITHMS["appo"](config, obs_space, action_space, torch.device("cpu"))
    layout = TrajectoryLayout(16, 4, (4,), "<f4", (), "<i8")
    ours = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert ray_start(config, workers=2)  # one Ray for the three pools: none of them stops it
    try:
        pool = RayActors("appo", config, layout, num_actors=2, slots_per_actor=2)
        published = [pool.publish(policy_vector(algo.net, algo.normalizer))]
        pool.start()
        seqs: dict[int, list[int]] = {0: [], 1: []}
        versions: dict[int, list[int]] = {0: [], 1: []}
        try:
            assert set(pool.nodes) == {"0", "1"}
            deadline = time.monotonic() + 120
            while min(len(s) for s in seqs.values()) < 25:
                assert time.monotonic() < deadline, f"only {seqs} arrived"
                for slot in pool.receive(0.1):
                    header, arrays = pool.ring.header(slot), pool.ring.slot(slot)
                    assert header["actor"] == pool.ring.owner(slot)
                    seqs[header["actor"]].append(header["seq"])
                    versions[header["actor"]].append(header["version"])
                    assert arrays["valid"].any() and np.isfinite(arrays["logprobs"]).all()
                    time.sleep(0.05)  # a slow learner: the actors wait for it
                    pool.release(slot)
                    published.append(pool.publish(policy_vector(algo.net, algo.normalizer)))
            assert pool.backlog() <= pool.num_slots
        finally:
            produced = pool.close()
        assert produced.consistent, produced
        assert published == list(range(1, len(published) + 1))
        for actor, got in seqs.items():
            assert got == list(range(len(got))), f"actor {actor}: out of order, lost or twice: {got}"
            assert versions[actor] == sorted(versions[actor]) and set(versions[actor]) <= set(published)
            assert versions[actor][-1] > 1, "the actor never took newer weights"
            # what close() still received: at most the requests in flight (slots_per_actor)
            assert len(got) <= produced.sent[actor] <= len(got) + 2, (produced, len(got))

        size = len(policy_vector(algo.net, algo.normalizer))
        pool = RayActors("appo", config, layout, num_actors=2, slots_per_actor=1)
        pool.publish(np.zeros(size - 1, np.float32))  # too short for the network: its load raises
        pool.start()
        try:
            with pytest.raises(ActorFailed, match=r"^actor [01] raised RuntimeError: [^\n]+$"):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    pool.receive(0.1)
        finally:
            pool.close()

        pool = RayActors("appo", dataclasses.replace(config, env="NoSuchEnv-v0"), layout, num_actors=1)
        pool.publish(np.zeros(size, np.float32))
        try:
            with pytest.raises(ActorFailed, match=r"^actor 0 failed to start: [^\n]*NoSuchEnv"):
                pool.start()
        finally:
            pool.close()
        assert ray.is_initialized()  # the pools did not start it, so they left it running
    finally:
        ray.shutdown()
        for s, handler in ours.items():
            signal.signal(s, handler)

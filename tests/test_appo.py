"""IMPALA and APPO runs: the run directory, the trajectory counts, evaluation, resume, what is
refused in one line, and shutdown (Ctrl-C, SIGKILL of the learner) with no process and no /dev/shm
entry left behind."""

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
import torch
from gymnasium import spaces
from test_shutdown import finish, left_in_shm, session, session_ends, shm

import shoal
from shoal.actors.actor import ActorPolicy, policy_vector
from shoal.algos import ALGORITHMS
from shoal.algos.base import Trajectories
from shoal.cli import main
from shoal.configio import ConfigError
from shoal.run import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_envs=4, rollout_length=16, eval_episodes=2, seed=1)


def check_counts(summary: dict) -> None:
    """Every trajectory sent was received once, and was learned from, dropped or left at the end."""
    assert summary["trajectories_consistent"] is True, summary
    assert summary["trajectories_sent"] == summary["trajectories_received"] > 0
    used = summary["trajectories_learned"] + summary["trajectories_dropped_stale"]
    assert used + summary["trajectories_unused_at_end"] == summary["trajectories_received"]


@pytest.mark.slow
def test_appo_run_writes_a_run_dir_and_evaluates(tmp_path):
    before = shm()
    run_dir = tmp_path / "appo"
    agent = shoal.APPO("CartPole-v1", total_steps=3072, checkpoint_every=1024, run_dir=str(run_dir), **SMALL)
    agent.learn(progress=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    check_counts(summary)
    assert summary["env_steps"] >= 3072 and summary["episodes"] == 2
    assert summary["updates"] == summary["trajectories_learned"] // 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "sps",
        "actor_sps",
        "policy_lag",
        "policy_lag_max",
        "queue_fill",
        "learner_busy",
        "trajectories_dropped",
    ):
        assert key in rows[-1], key
    assert len(list((run_dir / "checkpoints").glob("ckpt-*.json"))) >= 3  # two boundaries and the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    lags = events.Histograms("policy_lag")  # one per metrics row
    assert 0 < len(lags) <= len(rows) and lags[-1].histogram_value.num > 0
    assert agent.act(np.zeros(4, np.float32)) in (0, 1)
    assert main(["eval", str(run_dir), "--episodes", "2", "--json"]) == 0
    assert not left_in_shm(before)

    # A resume continues from the last checkpoint (not exactly: the actors start afresh).
    last = ckpt.load(ckpt.latest(run_dir / "checkpoints"))[1]
    assert main(["train", "appo", "--resume", str(run_dir), "--total-steps", "5120", "--quiet"]) == 0
    resumed = json.loads((run_dir / "summary.json").read_text())
    check_counts(resumed)
    assert resumed["updates"] == last["updates"] + resumed["trajectories_learned"] // 2
    steps = [json.loads(line)["env_steps"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == resumed["env_steps"] >= 5120

    # Refused (not implemented, or meaningless here): one line each, before anything starts.
    for settings, words in [
        (dict(backend="ray", ray_gpus_per_worker=1.0), "act on CPU"),
        (dict(backend="local"), "--backend mp"),
        (dict(nan_policy="skip"), "not implemented"),
        (dict(num_workers=2), "--num-actors"),
    ]:
        with pytest.raises(ConfigError, match=words):
            shoal.APPO("CartPole-v1", **settings)


@pytest.mark.slow
def test_a_last_batch_bigger_than_the_slots_ends_past_total_steps_and_its_checkpoints_load(tmp_path):
    """The learner fills its last batch whole: with 6 trajectories a batch and 2 actors x 2
    slots the run ends more steps past total_steps than the slots hold (it ended 1,056 past
    300k with 8), and ``shoal eval`` of its final and best checkpoints refused them. One batch
    of 6 x 64 steps against a budget of 64 ends at least 320 past it, however the trajectories
    arrive (a budget spanning two batches ended only 32 past when they came in a burst)."""
    run_dir = tmp_path / "impala"
    settings = dict(SMALL, batch_trajectories=6, total_steps=64, run_dir=str(run_dir))
    summary = shoal.IMPALA("CartPole-v1", **settings).learn(progress=False).summary
    assert summary["env_steps"] - 64 > 2 * 2 * 16 * 4  # 2 actors x 2 slots of 16 steps x 4 envs
    assert main(["eval", str(run_dir), "--episodes", "2", "--json"]) == 0
    assert main(["eval", str(run_dir), "--best", "--episodes", "2", "--json"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("nice", [10, 0])
def test_actors_run_below_the_learner(tmp_path, nice):
    """--actor-nice (10 by default): the actor processes run at that much lower priority, so
    the learner every actor waits on is not preempted by them. On 2 cores it made APPO's
    updates on CartPole ~20% faster, and APPO x2 on HeavyCartPole 10-19% faster."""
    from shoal.agent import make_config
    from shoal.algos import APPO
    from shoal.training.decoupled import DecoupledTrainer

    settings = dict(SMALL, total_steps=1024, actor_nice=nice, run_dir=str(tmp_path / "appo"))
    trainer = DecoupledTrainer(APPO, make_config("appo", "CartPole-v1", settings), progress=False)
    seen = []
    trainer.train(
        on_update=lambda t: seen.extend(os.getpriority(os.PRIO_PROCESS, p.pid) for p in t.actors.procs)
    )
    assert seen and set(seen) == {min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice)}


@pytest.mark.slow
def test_impala_continuous_actions_drops_stale_trajectories(tmp_path):
    """Box actions, normalised observations and rewards, and --max-policy-lag 0: every
    trajectory acted by an older policy than the learner's is dropped, and counted."""
    run_dir = tmp_path / "impala"
    settings = dict(SMALL, max_policy_lag=0, normalize_obs=True, normalize_reward=True, log_every=256)
    summary = (
        shoal.IMPALA("Pendulum-v1", total_steps=4096, run_dir=str(run_dir), **settings)
        .learn(progress=False)
        .summary
    )
    check_counts(summary)
    assert summary["trajectories_dropped_stale"] > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("policy_lag_max", 0) == 0 for r in rows)
    assert np.isfinite(summary["mean_return"])
    assert main(["eval", str(run_dir), "--episodes", "2", "--json"]) == 0  # its steps include drops
    stats = ckpt.load(ckpt.latest(run_dir / "checkpoints"))[0]["norm/used"]
    assert stats[-3] > 1000  # the return statistics counted (their count is the third-last entry)


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    """``shoal train appo`` for a long time, in a session of its own (its pid is the session id)."""
    argv = [
        "train",
        "appo",
        "--env",
        "CartPole-v1",
        "--quiet",
        "--run-dir",
        str(run_dir),
        "--log-every",
        "500",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", *argv, "--total-steps", str(10**7), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def actors(sid: int) -> dict[str, int]:
    """The actor processes of session ``sid`` by name (the session also holds multiprocessing's
    resource tracker)."""
    out = {}
    for pid in session(sid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("shoal-actor-"):
            out[name] = pid
    return out


def wait_learning(proc: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    """Until the learner has logged a metrics row and both actors run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early with {proc.returncode}: {proc.communicate()[1]}")
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().strip() and len(actors(proc.pid)) == 2:
            return
        time.sleep(0.05)
    pytest.fail("the run logged no metrics in time")


FORKED_ACTORS = """
import os, sys
import shoal

class Proxy:  # as a progress bar's stderr proxy: its lock may be held by a thread fork leaves behind
    def __init__(self, real, log):
        self.real, self.log, self.owner = real, log, os.getpid()
    def write(self, text):
        return self.real.write(text) if os.getpid() == self.owner else self._used()
    def flush(self):
        return self.real.flush() if os.getpid() == self.owner else self._used()
    def _used(self):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\\n")
    def __getattr__(self, name):
        return getattr(self.real, name)

print("written before training", end="")  # sits in stdout's buffer (a pipe) when actors start
sys.stderr = Proxy(sys.stderr, sys.argv[2])
shoal.APPO("CartPole-v1", total_steps=1024, run_dir=sys.argv[1], num_envs=4, rollout_length=16,
           eval_episodes=1, seed=1).learn(progress=False)
"""


@pytest.mark.slow
def test_forked_actors_neither_repeat_buffered_output_nor_write_through_a_replaced_stderr(tmp_path):
    """Actors are forked (Linux). They must not write the learner's buffered stdout again
    when they exit (multiprocessing flushes it before forking), nor touch its replaced
    sys.stderr: a rich progress bar's proxy, whose lock a thread that fork did not copy may
    hold, so that an actor flushing it at exit would hang until killed."""
    log = tmp_path / "proxy-used-by"
    done = subprocess.run(
        [sys.executable, "-c", FORKED_ACTORS, str(tmp_path / "run"), str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("written before training") == 1, done.stdout
    assert not log.exists(), f"actors wrote through the learner's stderr proxy: {log.read_text()}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    check_counts(summary)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_leaves_no_process_nor_shared_memory(tmp_path):
    before = shm()
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_learning(proc, run_dir)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the actors get it too (and ignore it)
    err = finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert f"resume with: shoal train appo --resume {run_dir}" in err, err
    assert not session_ends(proc.pid, grace=10), "processes of the run outlived it"
    assert not left_in_shm(before)
    assert list((run_dir / "checkpoints").glob("ckpt-*.json"))
    assert not (run_dir / "summary.json").exists()  # stopped, not finished
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0


@pytest.mark.slow
def test_sigkill_of_the_learner_ends_its_actors(tmp_path):
    before = shm()
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_learning(proc, run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not session_ends(proc.pid, grace=10), "actors outlived their learner"
    assert not left_in_shm(before)  # the shared memory was never a named file


@pytest.mark.slow
def test_a_killed_actor_ends_the_run_in_one_line_when_no_replacement_is_allowed(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "--max-restarts", "0")
    wait_learning(proc, run_dir)
    actor = actors(proc.pid)["shoal-actor-1"]
    os.kill(actor, signal.SIGKILL)
    err = finish(proc)
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    assert re.search(
        r"^shoal: error: actor 1 was killed by SIGKILL; the run stopped, resume it from checkpoint \S+$",
        err,
        re.M,
    ), err
    assert ckpt.load(ckpt.latest(run_dir / "checkpoints"))[1]["env_steps"] > 0  # whole, resumable
    assert not session_ends(proc.pid, grace=10), "processes of the run outlived it"


def run_with_actor_faults(
    tmp_path: Path, faults: list[dict], *args: str, total: int = 60_000, code: int = 0
) -> tuple[dict | None, str]:
    """An APPO run of ``total`` steps whose actors signal themselves as ``faults`` say; its
    summary (None if it did not finish) and stderr, after checking that it exited with
    ``code``, that each fault fired once and that the run left no process behind."""
    claims = tmp_path / "claims"
    claims.mkdir()
    run_dir = tmp_path / "run"
    argv = ["train", "appo", "--env", "CartPole-v1", "--quiet", "--run-dir", str(run_dir)]
    argv += ["--total-steps", str(total), "--eval-episodes", "2", *args]
    spec = json.dumps({"dir": str(claims), "faults": faults})
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "SHOAL_TEST_FAULTS": spec},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    err = finish(proc, timeout=240)
    assert not session_ends(proc.pid, grace=10), "processes of the run outlived it"
    assert proc.returncode == code, err
    assert len(list(claims.iterdir())) == len(faults)  # each fault fired, once
    summary = run_dir / "summary.json"
    return (json.loads(summary.read_text()) if summary.exists() else None), err


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_the_learner_trains_on(tmp_path):
    summary, err = run_with_actor_faults(
        tmp_path, [{"at_trajectories": 30, "signal": "SIGKILL", "ranks": [1]}]
    )
    assert summary["actors_replaced"] == 1
    assert summary["env_steps"] >= 60000
    check_counts(summary)  # what the lost actor announced was received exactly once
    assert summary["trajectories_lost_with_actors"] in (0, 1)  # at most the one it was sending
    assert re.search(
        r"^shoal: actor 1 was killed by SIGKILL; a new actor 1 takes its place while the"
        r" learner trains on \(replacement 1 of at most 10\)$",
        err,
        re.M,
    ), err
    assert "Traceback" not in err, err


@pytest.mark.slow
def test_a_hung_actor_is_ended_by_the_hang_timeout_and_replaced(tmp_path):
    faults = [{"at_trajectories": 30, "signal": "SIGSTOP", "ranks": [0]}]  # stopped, not dead
    summary, err = run_with_actor_faults(tmp_path, faults, "--hang-timeout", "3")
    assert summary["actors_replaced"] == 1
    assert summary["env_steps"] >= 60000
    check_counts(summary)
    assert re.search(
        r"^shoal: actor 0 sent nothing for 3 s \(stopped or stuck; --hang-timeout\)", err, re.M
    ), err


@pytest.mark.slow
def test_lost_actors_beyond_max_restarts_stop_the_run_with_a_checkpoint(tmp_path):
    faults = [{"at_trajectories": n, "signal": "SIGKILL", "ranks": [1]} for n in (10, 20)]
    args = ("--max-restarts", "1", "--checkpoint-every", "5000")
    summary, err = run_with_actor_faults(tmp_path, faults, *args, total=10**7, code=1)
    assert summary is None  # stopped, not finished
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"shoal: error: actor 1 was killed by SIGKILL, after 1 replacements, the limit \(--max-restarts\);"
        r" the run stopped, resume it from checkpoint \S+",
        last,
    ), err
    assert "Traceback" not in err
    assert ckpt.load(ckpt.latest(tmp_path / "run" / "checkpoints"))[1]["env_steps"] > 0


@pytest.mark.parametrize("algo", ["impala", "appo"])
@pytest.mark.parametrize(
    ("obs_space", "action_space"),
    [
        (spaces.Box(-1, 1, (4,), np.float32), spaces.Discrete(2)),
        (spaces.Box(-1, 1, (3,), np.float32), spaces.Box(-2, 2, (1,), np.float32)),
        (spaces.Box(0, 255, (36, 36, 3), np.uint8), spaces.Discrete(3)),  # the CNN
    ],
    ids=["mlp-discrete", "mlp-box", "cnn-discrete"],
)
def test_learn_on_a_batch_of_trajectories_in_every_space(algo, obs_space, action_space):
    """What the learner loop hands an algorithm, built by hand: one update changes the
    weights, its metrics are finite, and the actors' network acts on these observations."""
    cls = ALGORITHMS[algo]
    config = cls.config_class(env="custom", num_envs=2, rollout_length=5, total_steps=1000)
    learner = cls(config, obs_space, action_space, torch.device("cpu"))
    t, m = 5, 4
    obs = torch.as_tensor(np.stack([[obs_space.sample() for _ in range(m)] for _ in range(t + 1)]))
    with torch.no_grad():
        actions, logprobs = learner.net.sample(learner._obs(obs[:t].flatten(0, 1)))
    done = torch.zeros(t, m)
    done[2, 1] = 1.0
    valid = torch.ones(t, m, dtype=torch.bool)
    valid[3, 1] = False  # the autoreset step after that episode end
    batch = Trajectories(
        obs,
        actions.view(t, m, *actions.shape[1:]),
        logprobs.view(t, m) - 0.1,
        torch.randn(t, m),
        done,
        torch.zeros(t, m),
        valid,
    )
    before = [p.detach().clone() for p in learner.net.parameters()]
    metrics = learner.learn(batch, env_steps=100)
    assert all(np.isfinite(v) for k, v in metrics.items() if k != "explained_variance"), metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.net.parameters()))
    net = cls.actor_network(config, obs_space, action_space)
    policy = ActorPolicy(net, action_space, normalize_obs=False, obs_clip=10.0)
    policy.load(policy_vector(learner.net, learner.normalizer))
    env_actions, _, _ = policy.act(obs[0].numpy())
    assert all(action_space.contains(a) for a in env_actions)

"""Distributed runs stopped the way schedulers stop them, and ranks that hang.

Slurm's ``scancel``, systemd, ``timeout`` and a terminal's Ctrl-C signal the whole process
group, not only the launcher; ``kill -STOP`` freezes a rank without killing it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shoal.run import checkpoint as ckpt
from shoal.run.rundir import clean_stale_scratch
from shoal.training.callbacks import FAULTS_VARIABLE
from tests.test_shutdown import finish, left_in_shm, session_ends, shm

pytestmark = pytest.mark.slow


STOPPED = re.compile(
    r"^shoal: interrupted \((SIG\w+)\): checkpoint saved to (\S+\.json); resume with: shoal train "
)


def start(tmp_path: Path, algo: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    two = "--num-actors" if algo in ("appo", "impala") else "--num-workers"  # decoupled: actors
    cmd = [
        sys.executable, "-m", "shoal.cli", "train", algo, "--env", "CartPole-v1", two, "2",
        "--num-envs", "4", "--run-dir", str(tmp_path / "run"), "--quiet", *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )


def wait_metrics(proc: subprocess.Popen, run_dir: Path, rows: int = 2, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)


@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("backend", "algo", "args", "signum"),
    [
        ("mp", "ppo", ["--strategy", "sync"], signal.SIGTERM),
        ("mp", "ppo", ["--strategy", "a3c"], signal.SIGINT),  # (SIGINT to sync: test_worker_faults)
        ("mp", "ppo", ["--strategy", "a3c"], signal.SIGTERM),
        ("mp", "dqn", ["--strategy", "param-avg"], signal.SIGTERM),
        ("mp", "ppo", ["--strategy", "param-server", "--ps-mode", "sync"], signal.SIGTERM),
        ("ray", "ppo", ["--strategy", "sync"], signal.SIGTERM),
        ("mp", "appo", [], signal.SIGTERM),  # the learner and its actor processes
    ],
    ids=[
        "mp-sync-TERM",
        "mp-a3c-INT",
        "mp-a3c-TERM",
        "mp-param-avg-TERM",
        "mp-ps-TERM",
        "ray-TERM",
        "appo-TERM",
    ],
)
def test_a_signal_to_the_whole_process_group_stops_every_rank_with_a_checkpoint(
    tmp_path, backend, algo, args, signum
):
    sems = shm("sem.mp-*")
    proc = start(tmp_path, algo, "--backend", backend, "--total-steps", str(10**7), *args)
    wait_metrics(proc, tmp_path / "run")
    os.killpg(proc.pid, signum)
    err = finish(proc, timeout=90)  # (it hung for good before: a multiprocessing Event's set())
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if STOPPED.match(line)]
    saved = STOPPED.match(line).group(2)
    assert ckpt.load(saved)[1]["env_steps"] > 0
    assert not session_ends(proc.pid, grace=20), "processes of the run outlived it"
    assert not left_in_shm(sems, "sem.mp-*"), "named semaphores left in /dev/shm"


@pytest.mark.timeout(300)
def test_kill_9_of_the_whole_group_leaves_no_process_no_semaphore_and_its_scratch_is_cleaned(tmp_path):
    sems = shm("sem.mp-*")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = start(
        tmp_path,
        "ppo",
        "--backend",
        "mp",
        "--total-steps",
        str(10**7),
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    wait_metrics(proc, tmp_path / "run")
    scratch = list(tmp.glob("shoal-group-*"))
    assert len(scratch) == 1 and str(proc.pid) in scratch[0].name
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not session_ends(proc.pid, grace=20), "processes of the run outlived it"
    assert not left_in_shm(sems, "sem.mp-*"), "named semaphores left in /dev/shm"
    assert clean_stale_scratch(base=tmp) == scratch  # what the next launcher does first
    # (torch keeps a cache of its own there, torchinductor_<user>, made by its first optimizer)
    assert [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []


def stop_worker_at(tmp_path: Path, steps: int) -> dict[str, str]:
    claims = tmp_path / "claims"
    claims.mkdir()
    spec = {"dir": str(claims), "faults": [{"at_steps": steps, "signal": "SIGSTOP", "ranks": [1]}]}
    return {**os.environ, FAULTS_VARIABLE: json.dumps(spec)}


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("strategy", "replaced"), [("a3c", True), ("sync", False)])
def test_a_stopped_worker_is_found_within_hang_timeout_and_lost_like_a_dead_one(tmp_path, strategy, replaced):
    args = ["--backend", "mp", "--strategy", strategy, "--total-steps", "24000", "--checkpoint-every", "4096"]
    proc = start(tmp_path, "ppo", *args, "--hang-timeout", "5", env=stop_worker_at(tmp_path, 10_000))
    started = time.monotonic()
    err = finish(proc, timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert len(list((tmp_path / "claims").iterdir())) == 1, (
        "the worker was never stopped: the test proved nothing"
    )
    lines = [line for line in err.splitlines() if "showed no sign of life for 5 s" in line]
    assert len(lines) == 1, err[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["worker_replacements"], summary["group_rebuilds"]) == ((1, 0) if replaced else (0, 1))
    assert time.monotonic() - started < 280
    assert not session_ends(proc.pid, grace=20), "processes of the run outlived it"


@pytest.mark.timeout(400)
def test_a_stopped_parameter_server_is_found_within_hang_timeout_and_the_group_rebuilt(tmp_path):
    args = ["--backend", "mp", "--strategy", "a3c", "--total-steps", "24000", "--checkpoint-every", "4096"]
    proc = start(tmp_path, "ppo", *args, "--hang-timeout", "5")
    wait_metrics(proc, tmp_path / "run")
    (server,) = [p for p in psutil.Process(proc.pid).children() if p.name() == "shoal-server"]
    server.send_signal(signal.SIGSTOP)
    err = finish(proc, timeout=300)
    assert proc.returncode == 0, err[-3000:]
    hung = [line for line in err.splitlines() if "the server showed no sign of life for 5 s" in line]
    assert len(hung) == 1, err[-3000:]
    assert "rebuilding the group" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["group_rebuilds"] == 1 and summary["env_steps"] >= 24000
    assert not session_ends(proc.pid, grace=20), "processes of the run outlived it"


RAY_MASKS = """
import json, os, signal
import psutil, ray
from shoal.agent import make_config
from shoal.launch.ray_backend import ray_start

def blocked(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)

assert ray_start(make_config("ppo", "CartPole-v1", dict(backend="ray", num_workers=2, strategy="sync")))
ours = {p.name(): blocked(p.pid) for p in psutil.Process().children() if p.name() in ("raylet", "gcs_server")}
print(json.dumps({"driver": blocked(os.getpid()), "ray": ours}))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_local_rays_own_processes_ignore_a_sigterm_to_the_group_and_the_driver_does_not():
    """A group SIGTERM once ended the raylet (in our process group) while the ranks saved."""
    done = subprocess.run([sys.executable, "-c", RAY_MASKS], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    masks = json.loads(done.stdout.strip().splitlines()[-1])
    assert masks == {"driver": False, "ray": {"raylet": True, "gcs_server": True}}, masks

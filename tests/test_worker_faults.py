"""Training workers killed mid-run: the launcher rebuilds the group and the run still learns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from shoal.training.callbacks import FAULTS_VARIABLE
from tests.test_distributed import check_two_worker_run, shoal_train

pytestmark = pytest.mark.slow


def training_ranks(root: int, backend: str) -> list[psutil.Process]:
    """The live training-worker processes of the run started as ``root`` (not the server)."""
    out = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            if backend == "ray":
                mine = cmd.startswith("ray::RayWorker")
            else:  # mp: spawned children of the launcher, one per rank
                mine = proc.ppid() == root and "spawn_main" in cmd and "resource_tracker" not in cmd
            if mine and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


class Chaos(threading.Thread):
    """Kills training workers at deterministic points: worker ``r`` that first finishes an
    update past ``at_steps[j]`` env steps SIGKILLs itself (``SHOAL_TEST_FAULTS``, see
    ``shoal.training.callbacks.FaultInjection``). This thread only watches the claims and
    records which ranks were alive around each kill."""

    def __init__(self, root: int, backend: str, claims: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.backend, self.claims = root, backend, claims
        self.killed: list[int] = []
        self.survivors: list[set[int]] = []  # the other ranks' pids at each kill
        self.later: list[set[int]] = []  # the ranks' pids a few seconds after each kill
        self.stop = threading.Event()

    @staticmethod
    def spec(claims: Path, at_steps: list[int]) -> str:
        faults = [{"at_steps": n, "signal": "SIGKILL"} for n in at_steps]
        return json.dumps({"dir": str(claims), "faults": faults})

    def run(self) -> None:
        seen: set[str] = set()
        while not self.stop.wait(0.05):
            for claim in sorted(self.claims.glob("fault-*")):
                text = claim.read_text()
                if claim.name in seen or not text.endswith("\n"):
                    continue
                seen.add(claim.name)
                pid = int(text.split()[0])
                self.killed.append(pid)
                self.survivors.append(
                    {r.pid for r in training_ranks(self.root, self.backend) if r.pid != pid}
                )
                if not self.stop.wait(3.0):
                    self.later.append({r.pid for r in training_ranks(self.root, self.backend)})


def chaos_run(tmp_path, backend: str, strategy: str, at_steps: list[int], *extra: str) -> dict:
    run_dir, claims = tmp_path / "run", tmp_path / "claims"
    claims.mkdir()
    cmd = [
        sys.executable, "-m", "shoal.cli", "train", "ppo", "--env", "CartPole-v1",
        "--backend", backend, "--strategy", strategy, "--num-workers", "2", "--num-envs", "4",
        "--seed", "1", "--checkpoint-every", "4096", "--run-dir", str(run_dir), "--quiet", *extra,
    ]  # fmt: skip
    env = {**os.environ, FAULTS_VARIABLE: Chaos.spec(claims, at_steps)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    chaos = Chaos(proc.pid, backend, claims)
    chaos.start()
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        chaos.stop.set()
        chaos.join()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    check_two_worker_run(run_dir, summary, backend, strategy)
    assert len(chaos.killed) == len(at_steps), (
        f"faults fired {len(chaos.killed)} of {len(at_steps)}: {err[-2000:]}"
    )
    if strategy in ("a3c", "param-server"):  # the others train on; a new worker replaces the lost one
        assert summary["worker_replacements"] == len(chaos.killed), (summary, err[-2000:])
        assert summary["group_rebuilds"] == 0
        assert "while the others train on" in err
        for before, after in zip(chaos.survivors, chaos.later):
            if len(after) >= 2:  # (fewer: ranks are ending with the run, as they may)
                assert before <= after, "a surviving worker was restarted"
        assert summary["parameter_server"]["workers_lost"] == len(chaos.killed)
    else:  # one group of all workers: rebuilt from the last checkpoint
        assert summary["group_rebuilds"] == len(chaos.killed), (summary, chaos.killed, err[-2000:])
        assert "rebuilding the group" in err
        # The survivors fail too (their gloo links break): one line says so, not their tracebacks.
        assert "Traceback" not in err, err[-3000:]
    return summary


@pytest.mark.timeout(600)
def test_chaos_sync_on_mp_rebuilds_from_checkpoints_and_still_solves_cartpole(tmp_path):
    summary = chaos_run(tmp_path, "mp", "sync", [12_000, 30_000, 48_000])
    assert summary["mean_return"] >= 475, summary


@pytest.mark.timeout(600)
def test_chaos_a3c_on_mp_replaces_lost_workers_while_the_others_train_on(tmp_path):
    summary = chaos_run(tmp_path, "mp", "a3c", [12_000, 30_000, 48_000])
    assert summary["mean_return"] >= 475, summary


@pytest.mark.timeout(600)
def test_killed_ray_worker_actor_is_replaced_and_a3c_trains_on(tmp_path):
    # The mechanics on Ray; solving CartPole through kills is the mp tests' (same strategy code).
    summary = chaos_run(tmp_path, "ray", "a3c", [12_000], "--total-steps", "32768")
    assert summary["env_steps"] >= 32768


@pytest.mark.timeout(600)
def test_sync_parameter_server_finishes_its_rounds_without_a_lost_worker_and_takes_its_replacement(tmp_path):
    summary = chaos_run(
        tmp_path, "mp", "param-server", [12_000, 30_000], "--ps-mode", "sync", "--total-steps", "49152"
    )
    assert summary["parameter_server"]["workers_joined"] == 2 + 2
    assert summary["env_steps"] >= 49152


@pytest.mark.timeout(400)
def test_a_group_rebuilt_after_kills_ends_bitwise_as_the_run_that_was_never_killed(tmp_path):
    """Every worker of a lockstep group saves its own state at each boundary (replay buffer,
    random streams, param-avg's own weights and optimizer moments, averaging schedule, anchors
    and error-feedback residuals), so a group rebuilt from a checkpoint goes on as if nothing
    happened: worker 1 killed, then the chief. A worker without its own checkpoint resumes
    from the chief's, with a warning."""
    from shoal.run import checkpoint as ckpt

    args = [
        "dqn", "--env", "CartPole-v1", "--backend", "mp", "--strategy", "param-avg", "--compress", "topk",
        "--num-workers", "2", "--total-steps", "4000", "--checkpoint-every", "1000", "--seed", "3",
        "--eval-episodes", "1",
    ]  # fmt: skip
    shoal_train(*args, "--run-dir", str(tmp_path / "whole"))
    claims = tmp_path / "claims"
    claims.mkdir()
    faults = [{"at_steps": 2500, "signal": "SIGKILL", "ranks": [1]}]
    faults.append({"at_steps": 3500, "signal": "SIGKILL", "ranks": [0]})
    spec = json.dumps({"dir": str(claims), "faults": faults})
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "train", *args, "--run-dir", str(tmp_path / "killed"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, FAULTS_VARIABLE: spec},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(claims.glob("fault-*"))) == 2 and done.stderr.count("rebuilding the group") == 2
    assert "of its own" not in done.stderr, done.stderr[-3000:]
    whole, _ = ckpt.load(tmp_path / "whole")
    killed, _ = ckpt.load(tmp_path / "killed")
    weights = [k for k in whole if k.startswith("model/")]
    assert weights and any(k.startswith("strategy/own/residual/") for k in whole)
    for key in weights:
        np.testing.assert_array_equal(killed[key], whole[key], err_msg=key)
    # Worker 1's own checkpoints lost: it resumes from the chief's state, said once; the run goes on.
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "rank-1")
    resumed = shoal_train("dqn", "--resume", str(tmp_path / "killed"), "--total-steps", "5000")
    assert resumed.stderr.count("worker 1 has no checkpoint of its own") == 1, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["env_steps"] >= 5000


@pytest.mark.timeout(600)
def test_killed_ray_worker_of_sync_rebuilds_the_group_and_trains_on(tmp_path):
    summary = chaos_run(tmp_path, "ray", "sync", [12_000], "--total-steps", "32768")
    assert summary["env_steps"] >= 32768


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("backend", "strategy", "signum", "code"),
    [
        ("mp", "sync", signal.SIGINT, 130),
        ("mp", "a3c", signal.SIGTERM, 143),
        ("ray", "sync", signal.SIGINT, 130),
    ],
)
def test_signal_stops_every_rank_with_a_checkpoint_and_leaves_no_process(
    tmp_path, backend, strategy, signum, code
):
    from shoal.run import checkpoint as ckpt
    from tests.test_shutdown import finish, session_ends, stopped_line

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "shoal.cli", "train", "ppo", "--env", "CartPole-v1", "--backend", backend,
        "--strategy", strategy, "--num-workers", "2", "--num-envs", "4", "--total-steps", str(10**7),
        "--run-dir", str(run_dir), "--quiet",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C in a terminal: the whole process group gets it
    else:
        os.kill(proc.pid, signum)
    err = finish(proc, timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _, saved, _ = stopped_line(err).groups()
    _, meta = ckpt.load(saved)
    assert meta["env_steps"] > 0
    assert not session_ends(proc.pid, grace=20), "processes of the run outlived it"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_a_rank_that_raises_stops_the_run_with_its_error_in_one_line(tmp_path, backend):
    # A learning rate of 1e30 makes the second update's loss infinite on every worker.
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "train", "ppo", "--env", "CartPole-v1", "--backend", backend]
        + ["--num-workers", "2", "--learning-rate", "1e30", "--total-steps", "20000"]
        + ["--run-dir", str(tmp_path / "run"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("shoal: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "NonFiniteError: loss is inf on worker" in lines[0], lines[0]
    assert "training stopped before the weights changed" in lines[0]


def _linked_worker(store_path: str, generation: int, die: bool, results) -> None:
    """A worker of generation ``generation``: links, takes the greeting, pushes once (or dies)."""
    import torch

    from shoal.distributed.link import WORKER, Link, announce, open_store
    from shoal.distributed.strategy import ServerStrategy

    store = open_store(f"file://{store_path}", host=False)
    announce(store, 0, generation)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    strategy = ServerStrategy(0, 1, link=Link(store, 0, generation, WORKER))
    strategy.start({"net": net}, {"optimizer": optimizer})
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    strategy.step(optimizer)
    strategy.finish()
    results.put(strategy.version)
    os._exit(0)


@pytest.mark.timeout(120)
def test_server_links_the_newest_replacement_and_skips_one_that_died_before_linking(tmp_path):
    import multiprocessing as mp

    import torch

    from shoal.distributed.link import announce, open_store
    from shoal.distributed.server import ParameterServer

    store_path = str(tmp_path / "store")
    store = open_store(f"file://{store_path}", host=True)
    net = torch.nn.Linear(3, 2)
    server = ParameterServer(torch.optim.SGD(net.parameters(), lr=1.0), 1, "async")
    stats: dict = {}
    thread = threading.Thread(target=lambda: stats.update(server.serve(store)), daemon=True)
    thread.start()
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    first = ctx.Process(target=_linked_worker, args=(store_path, 0, True, results))
    first.start()
    first.join(60)
    assert first.exitcode == -signal.SIGKILL
    announce(store, 0, 1)  # a replacement that died before it could link: never comes
    last = ctx.Process(target=_linked_worker, args=(store_path, 2, False, results))
    last.start()
    assert results.get() == 1  # its push was applied: global version 1
    last.join(30)
    thread.join(30)
    # Generation 1 announced itself, so it existed and was lost: it counts, skipped or not.
    assert stats == {"version": 1, "pushes": 1, "dropped": 0, "workers_lost": 2, "workers_joined": 2}


@pytest.mark.timeout(120)
def test_a_worker_that_dies_while_linking_counts_as_lost(tmp_path, monkeypatch):
    """Generation 1 announces itself and never completes its link (killed while linking): it is
    a lost worker as much as generation 0, killed after linking."""
    import multiprocessing as mp

    import torch

    from shoal.distributed import link
    from shoal.distributed.link import announce, open_store
    from shoal.distributed.server import ParameterServer

    monkeypatch.setattr(link, "SERVER_SETUP", __import__("datetime").timedelta(seconds=2))
    store_path = str(tmp_path / "store")
    store = open_store(f"file://{store_path}", host=True)
    net = torch.nn.Linear(3, 2)
    server = ParameterServer(torch.optim.SGD(net.parameters(), lr=1.0), 1, "async")
    stats: dict = {}
    thread = threading.Thread(target=lambda: stats.update(server.serve(store)), daemon=True)
    thread.start()
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    first = ctx.Process(target=_linked_worker, args=(store_path, 0, True, results))
    first.start()
    first.join(60)
    _wait_for(lambda: server.lost == 1)
    announce(store, 0, 1)  # the server opens this link, and nobody comes: 2 s later it gives up
    _wait_for(lambda: server.lost == 2)
    last = ctx.Process(target=_linked_worker, args=(store_path, 2, False, results))
    last.start()
    assert results.get() == 1
    last.join(30)
    thread.join(30)
    assert stats == {"version": 1, "pushes": 1, "dropped": 0, "workers_lost": 2, "workers_joined": 2}


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class _ScriptedLink:
    """A link whose worker pushes once and then dies; which side notices first is scripted.

    ``send_first``: the server's answer fails first, the listener's receive only afterwards;
    else the listener's receive fails first (the server then never answers). Generation 1 is
    a replacement that says Done at once.
    """

    send_first = True
    sends: list = []

    def __init__(self, store, worker: int, generation: int, side: int) -> None:
        self.worker, self.generation = worker, generation
        self.received = 0
        self.dead = threading.Event()

    def isend(self, tensor):
        return None  # the greeting: taken

    def wait(self, work, timeout=None) -> None:
        pass

    def recv(self, buffer, timeout=None) -> None:
        import torch

        from shoal.distributed import wire

        self.received += 1
        if self.generation == 1:
            message = wire.encode(wire.Done())
        elif self.received == 1 and self.send_first:
            message = wire.encode(wire.Push(0, 0, 1.0, 0.1, 0.0, (torch.ones(8),)))
        else:
            if self.send_first:
                self.dead.wait(30)  # the listener notices only after the failed send
            raise RuntimeError("Connection closed by peer")
        buffer[: message.numel()] = message

    def send(self, tensor, timeout=None) -> None:
        _ScriptedLink.sends.append(self.generation)
        if self.generation == 0:
            self.dead.set()
            raise RuntimeError("Connection closed by peer")

    def close(self) -> None:
        self.dead.set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("send_first", [True, False], ids=["send-fails-first", "recv-fails-first"])
def test_a_worker_killed_after_linking_counts_once_whichever_side_notices_first(
    tmp_path, monkeypatch, send_first
):
    import torch

    from shoal.distributed import server as server_module
    from shoal.distributed.link import announce, open_store
    from shoal.distributed.server import ParameterServer

    monkeypatch.setattr(server_module, "Link", _ScriptedLink)
    monkeypatch.setattr(_ScriptedLink, "send_first", send_first)
    monkeypatch.setattr(_ScriptedLink, "sends", [])
    store = open_store(f"file://{tmp_path / 'store'}", host=True)
    net = torch.nn.Linear(3, 2)
    server = ParameterServer(torch.optim.SGD(net.parameters(), lr=1.0), 1, "async")
    announce(store, 0, 0)
    stats: dict = {}
    thread = threading.Thread(target=lambda: stats.update(server.serve(store)), daemon=True)
    thread.start()
    _wait_for(lambda: server.lost == 1)
    announce(store, 0, 1)
    thread.join(30)
    assert _ScriptedLink.sends == ([0, 1] if send_first else [1])  # (1: the final weights)
    n = 1 if send_first else 0  # pushes applied
    assert stats == {"version": n, "pushes": n, "dropped": 0, "workers_lost": 1, "workers_joined": 2}

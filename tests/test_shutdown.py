"""Shutdown of a local run: SIGINT and SIGTERM stop with a checkpoint (exit 130 and 143); no
process of ours outlives a run, whether it ends, raises, is interrupted or is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.cli import Interrupted, _graceful_stop
from shoal.run import checkpoint as ckpt
from shoal.training.trainer import StopRequest, Trainer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "ppo", "--env", "CartPole-v1", "--vectorization", "process", "--env-workers", "2"]
STOPPED = re.compile(
    r"^shoal: interrupted \((SIG\w+)\): checkpoint saved to (\S+\.json); "
    r"resume with: shoal train ppo --resume (\S+)$"
)


def session(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session ``sid``, read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session_id = stat.rsplit(")", 1)[1].split()[:4]
        if int(session_id) == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


def session_ends(sid: int, grace: float) -> list[int]:
    """Wait up to ``grace`` seconds for session ``sid`` to empty; return what is left."""
    deadline = time.monotonic() + grace
    while (left := session(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def shm(pattern: str = "*") -> set[str]:
    """The names in /dev/shm (named shared memory and semaphores, ``sem.*``)."""
    return {p.name for p in Path("/dev/shm").glob(pattern)}


def left_in_shm(before: set[str], pattern: str = "*", grace: float = 20.0) -> set[str]:
    """What is in /dev/shm and not in ``before`` after up to ``grace`` seconds: what a run
    leaked. (The tests beside this one, in the other xdist process, make and free entries of
    their own meanwhile, such as multiprocessing's ``sem.mp-*``; a leaked entry stays for good.)"""
    deadline = time.monotonic() + grace
    while (new := shm(pattern) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return new


def start(run_dir: Path, *args: str, env_id: str = "CartPole-v1") -> subprocess.Popen:
    """``shoal train ppo`` in a session of its own (its pid is the session id)."""
    argv = [*TRAIN, "--quiet", "--run-dir", str(run_dir), *args]
    argv[3] = env_id
    code = (  # the CLI, with an env that raises in its 300th step registered
        "import sys, gymnasium as gym; "
        "gym.register('shoal-test/Failing-v0', entry_point='tests.envs:FailingEnv', "
        "kwargs={'fail_at': 300}); "
        "from shoal.cli import main; sys.exit(main())"  # main() parses sys.argv, as the `shoal` script
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 60) -> None:
    """Until the run has logged metrics and its env workers run (so there is something to stop)."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early with {proc.returncode}: {proc.communicate()[1]}")
        if metrics.exists() and metrics.read_text().strip() and len(session(proc.pid)) >= 3:
            return
        time.sleep(0.05)
    pytest.fail("the run logged no metrics in time")


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the run did not end in time")
    return err


def stopped_line(err: str) -> re.Match:
    lines = [line for line in err.splitlines() if line.startswith("shoal: interrupted")]
    assert len(lines) == 1, err
    match = STOPPED.match(lines[0])
    assert match, lines[0]
    return match


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to_group", "code"),
    [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
    ids=["sigint-to-group", "sigterm-to-parent"],
)
def test_signal_saves_a_checkpoint_exits_128_plus_n_and_resumes(tmp_path, signum, to_group, code):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "--total-steps", str(10**6))
    wait_training(proc, run_dir)
    if to_group:
        os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C does: env workers get it too
    else:
        os.kill(proc.pid, signum)  # as a process manager does
    err = finish(proc)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    name, saved, resume_dir = stopped_line(err).groups()
    assert name == signal.Signals(signum).name and Path(resume_dir) == run_dir
    assert not session_ends(proc.pid, grace=10), "processes of the run outlived it"

    # The stop checkpoint: no boundary comes before 100,000 steps, so this one is the stop's.
    _, meta = ckpt.load(saved)
    assert Path(saved) == ckpt.latest(run_dir / "checkpoints")
    logged = [json.loads(line)["env_steps"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 0 < logged[-1] <= meta["env_steps"] < 100_000
    assert not (run_dir / "summary.json").exists()  # the run is not finished

    total = meta["env_steps"] + 512
    resumed = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "train", "ppo", "--resume", str(run_dir)]
        + ["--total-steps", str(total), "--eval-episodes", "1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    rows = [json.loads(line)["env_steps"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(rows) and rows[-1] == total
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == total


def test_second_sigint_exits_at_once_and_leaves_whole_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "--total-steps", str(10**6))
    wait_training(proc, run_dir)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    err = finish(proc, timeout=30)
    assert proc.returncode == 130, err
    assert "shoal: interrupted" in err and "Traceback" not in err, err
    assert not session_ends(proc.pid, grace=10)
    for index in (run_dir / "checkpoints").glob("ckpt-*.json"):
        ckpt.load(index)  # each is whole: its checksum matches


@pytest.mark.slow
def test_normal_end_leaves_no_process(tmp_path):
    proc = start(tmp_path / "run", "--total-steps", "512", "--eval-episodes", "1")
    err = finish(proc)
    assert proc.returncode == 0, err
    assert not session_ends(proc.pid, grace=10)


@pytest.mark.slow
def test_exception_in_an_env_worker_exits_1_and_leaves_no_process(tmp_path):
    args = ("--total-steps", str(10**6), "--on-env-error", "raise")
    proc = start(tmp_path / "run", *args, env_id="shoal-test/Failing-v0")
    err = finish(proc)
    assert proc.returncode == 1, err
    assert "step 300 exploded" in err, err
    assert not session_ends(proc.pid, grace=10)


def test_sigkill_of_the_parent_ends_its_env_workers(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "--total-steps", str(10**6))
    wait_training(proc, run_dir)
    assert len(session(proc.pid)) >= 3  # the parent and its two env workers
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not session_ends(proc.pid, grace=10), "env workers outlived their parent"


def test_graceful_stop_handlers_first_stop_then_abort_then_restore():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest()
    with _graceful_stop(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between two bytecodes
        assert stop.signal == "SIGTERM"
        with pytest.raises(Interrupted) as raised:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert raised.value.signum == signal.SIGINT
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_signal_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The stop checkpoint is being written when the second signal lands: nothing half-written
    is ever taken for a checkpoint, and the run stops at once."""
    config = make_config(
        "ppo",
        "CartPole-v1",
        dict(
            num_envs=4,
            num_steps=32,  # 128 env steps per update, a boundary every other update
            total_steps=10**6,
            checkpoint_every=256,
            vectorization="sync",
            run_dir=str(tmp_path / "run"),
        ),
    )
    trainer = Trainer(ALGORITHMS["ppo"], config, progress=False)
    stop = trainer.stop = StopRequest()
    real_write = ckpt._write_tensors

    def write_tensors(f, arrays):  # noqa: ANN001, ANN202
        real_write(f, arrays)
        if stop:  # the stop's checkpoint: its tensors are written, its index is not yet
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)

    monkeypatch.setattr(ckpt, "_write_tensors", write_tensors)

    def first_signal(t: Trainer) -> bool:
        if t.env_steps == 1152:  # after an update that is no boundary: the next checkpoint is the stop's
            os.kill(os.getpid(), signal.SIGINT)
        return False

    started = time.monotonic()
    with _graceful_stop(stop), pytest.raises(Interrupted):
        trainer.train(on_update=first_signal)
    assert time.monotonic() - started < 30
    index = ckpt.latest(tmp_path / "run" / "checkpoints")
    _, meta = ckpt.load(index)  # whole
    assert stop.signal == "SIGINT" and trainer.env_steps == 1152
    assert meta["env_steps"] == 1024  # the boundary before the stop: the stop's index was never written
    assert list(index.parent.glob("ckpt-000000001152.json")) == []


SMALL = {
    "ppo": dict(num_envs=4, num_steps=32, update_epochs=2),
    "a2c": dict(num_envs=4, num_steps=5),
    "dqn": dict(num_envs=2, learning_starts=64, train_freq=16, gradient_steps=2, n_step=3, buffer_size=4096),
}


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_stop_checkpoint_mid_rollout_resumes_and_so_does_a_finished_run(tmp_path, algo):
    """A stop lands mid-rollout and mid-episode (DQN: with partial n-step transitions): its
    checkpoint resumes; so does a finished run's, to train further."""

    def trainer(total: int) -> Trainer:
        settings = dict(total_steps=total, vectorization="sync", eval_episodes=1, run_dir=str(tmp_path))
        config = make_config(algo, "CartPole-v1", {**SMALL[algo], **settings})
        made = Trainer(ALGORITHMS[algo], config, progress=False)
        made.stop = StopRequest()
        return made

    first = trainer(10**6)

    def stop_soon(t: Trainer) -> bool:
        if t.env_steps >= 300:
            t.stop.request("SIGTERM")  # as the handler does; the loop ends at its next step
        return False

    summary = first.train(on_update=stop_soon)
    assert summary["stopped"] == "SIGTERM" and 300 <= summary["env_steps"] < 10**6
    assert not (tmp_path / "summary.json").exists()
    index = ckpt.latest(tmp_path / "checkpoints")
    assert ckpt.load(index)[1]["env_steps"] == first.env_steps

    for total in (first.env_steps + 200, first.env_steps + 400):  # from the stop, then from the end
        resumed = trainer(total)
        resumed.train(resume=ckpt.latest(tmp_path / "checkpoints"))
        assert resumed.env_steps >= total
        assert (tmp_path / "summary.json").exists()


class _SignalsInFinalizer:
    """Sends this process a SIGINT from ``__del__``: the handler runs inside the finalizer."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # a few bytecodes for the handler to run here, in the finalizer
            pass


def test_a_second_signal_that_lands_in_a_finalizer_still_interrupts_quietly(capsys):
    """Python swallows an exception raised in a finalizer ("Exception ignored in ..."): a
    second Ctrl-C landing there must still end the run as a second Ctrl-C, with no traceback."""
    with pytest.raises(Interrupted), _graceful_stop(StopRequest()) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a stop request
        for _ in range(1000):
            pass
        assert stop.signal == "SIGINT"
        finalizer = _SignalsInFinalizer()
        del finalizer  # the second, raised in __del__ and swallowed there
        assert stop  # the loop runs on to its end
    err = capsys.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err

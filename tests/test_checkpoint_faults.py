"""Checkpoints under faults: a crash mid-save, damaged or foreign files, and kill -9 of a whole run."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from shoal.agent import load, make_config
from shoal.algos import ALGORITHMS
from shoal.cli import main
from shoal.run import checkpoint as ckpt
from shoal.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# -- a crash during a save ------------------------------------------------------------------------

# Saves checkpoint 1, then starts checkpoint 2 and stops dead at POINT (the parent SIGKILLs it
# there): a save is write tmp, fsync (1), rename (1), fsync dir (2) for the tensors, then the
# same (fsync 3, rename 2, fsync 4) for the JSON.
CRASHING_SAVE = r"""
import os, sys, time
import numpy as np
from shoal.run import checkpoint as ckpt

directory, point = sys.argv[1], sys.argv[2]
ckpt.save(directory, 1, {"w": np.full(50_000, 1.0, np.float32)}, {"n": 1})

def stop_here():
    print("ready", flush=True)
    time.sleep(300)

calls = {"fsync": 0, "replace": 0}
real_fsync, real_replace, real_write = os.fsync, os.replace, ckpt._write_tensors

def fsync(fd):
    calls["fsync"] += 1
    if point == f"fsync{calls['fsync']}":
        stop_here()
    real_fsync(fd)

def replace(src, dst):
    calls["replace"] += 1
    if point == f"replace{calls['replace']}":
        stop_here()
    real_replace(src, dst)

def half_written(f, arrays):
    import io
    whole = io.BytesIO()
    real_write(whole, arrays)
    f.write(whole.getvalue()[:100_000])
    f.flush()
    stop_here()

os.fsync, os.replace = fsync, replace
if point == "writing":
    ckpt._write_tensors = half_written
ckpt.save(directory, 2, {"w": np.full(50_000, 2.0, np.float32)}, {"n": 2})
"""

# where the save of checkpoint 2 dies -> the checkpoint latest() then finds
CRASH_POINTS = {
    "writing": 1,  # half the tensor file written (under its temporary name)
    "fsync1": 1,  # tensor file written, not yet synced
    "replace1": 1,  # ... synced, not yet renamed
    "fsync2": 1,  # tensor file in place: an orphan without its JSON
    "fsync3": 1,  # JSON written under its temporary name
    "replace2": 1,  # ... synced, not yet renamed
    "fsync4": 2,  # JSON renamed: checkpoint 2 is whole (the directory entry not yet synced)
}


@pytest.mark.slow
def test_a_crash_at_any_point_of_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "crashing_save.py"
    script.write_text(CRASHING_SAVE)
    procs = {
        point: subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / point), point], stdout=subprocess.PIPE, text=True
        )
        for point in CRASH_POINTS
    }
    try:
        for point, proc in procs.items():
            assert proc.stdout.readline() == "ready\n", point  # stopped at the point: kill it there
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
            proc.stdout.close()

    for point, expected in CRASH_POINTS.items():
        directory = tmp_path / point
        names = sorted(p.name for p in directory.iterdir())
        if expected == 1:  # the crash left debris: a temporary file, or the orphan tensor file
            assert any(n.endswith(".tmp") for n in names) or point == "fsync2", names
        assert ckpt.latest(directory).name == f"ckpt-{expected:012d}.json", (point, names)
        for source in (ckpt.latest(directory), directory):
            tensors, meta = ckpt.load(source)
            assert meta["n"] == expected and (tensors["w"] == expected).all(), point
        # and the next save goes through, whatever the debris
        ckpt.save(directory, 2, {"w": np.full(10, 3.0, np.float32)}, {"n": 3})
        tensors, meta = ckpt.load(directory)
        assert meta["n"] == 3 and (tensors["w"] == 3.0).all()
        assert not any(p.suffix == ".tmp" for p in directory.iterdir())  # the save cleared the debris


# -- damaged, foreign and malicious files ---------------------------------------------------------

SMALL_PPO = dict(num_envs=2, num_steps=32, total_steps=512, checkpoint_every=256, update_epochs=1)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory) -> Path:
    """A finished PPO run directory (copy it before damaging it)."""
    run_dir = tmp_path_factory.mktemp("ppo") / "run"
    config = make_config(
        "ppo",
        "CartPole-v1",
        {**SMALL_PPO, "run_dir": str(run_dir), "eval_episodes": 1, "vectorization": "sync"},
    )
    Trainer(ALGORITHMS["ppo"], config, progress=False).train()
    return run_dir


def copy_run(ppo_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run, and its latest checkpoint's JSON file."""
    run_dir = tmp_path / "run"
    shutil.copytree(ppo_run, run_dir)
    return run_dir, ckpt.latest(run_dir / "checkpoints")


class RunsCode:
    """Unpickling this creates a file: proof that a loader executed what it read."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def damage(kind: str, index: Path, marker: Path) -> str:
    """Damage the checkpoint ``index`` (its JSON) in one way; return the message expected."""
    weights = index.with_suffix(".safetensors")
    data = weights.read_bytes()
    info = json.loads(index.read_text())
    if kind == "truncated":
        weights.write_bytes(data[: len(data) // 3])
        return "is corrupted or truncated (checksum mismatch)"
    if kind == "flipped byte in the tensors":
        weights.write_bytes(data[:-100] + bytes([data[-100] ^ 0x01]) + data[-99:])
        return "is corrupted or truncated (checksum mismatch)"
    if kind == "flipped byte in the JSON":  # one bit: still valid JSON, "boundary": 1 became 0
        text = index.read_bytes()
        at = text.index(b'"boundary": 1') + len(b'"boundary": ')
        index.write_bytes(text[:at] + bytes([text[at] ^ 0x01]) + text[at + 1 :])
        return "is corrupted (checksum mismatch)"
    if kind == "JSON from another program":
        index.write_text(json.dumps({"name": "my-model", "weights": weights.name, "epochs": 3}))
        return "is not a shoal checkpoint (format None"
    if kind == "pickle renamed as the JSON":
        index.write_bytes(pickle.dumps(RunsCode(marker)))
        return "is not a readable shoal checkpoint"
    if kind == "pickle as the tensor file, checksums matching":  # as a forger would make it
        weights.write_bytes(pickle.dumps({"model/net": RunsCode(marker)}))
        info["sha256"] = ckpt.sha256(weights)
        info["json_sha256"] = ckpt._digest(info)
        index.write_text(json.dumps(info))
        return "cannot be read"
    if kind == "tensor file outside the run":
        (index.parents[2] / "elsewhere.safetensors").write_bytes(data)
        info["weights"] = "../../elsewhere.safetensors"
        info["json_sha256"] = ckpt._digest(info)
        index.write_text(json.dumps(info))
        return "no valid 'weights' file name"
    if kind == "shoal format, not a run":
        ckpt.save(index.parent, 10**9, {"w": np.zeros(3, np.float32)}, {"note": "not a training run"})
        return "is not a checkpoint of a shoal run (no algo, config"
    raise AssertionError(kind)


DAMAGE = [
    "truncated",
    "flipped byte in the tensors",
    "flipped byte in the JSON",
    "JSON from another program",
    "pickle renamed as the JSON",
    "pickle as the tensor file, checksums matching",
    "tensor file outside the run",
    "shoal format, not a run",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_or_foreign_checkpoints_are_refused_in_one_line_and_nothing_runs(
    ppo_run, tmp_path, kind, capsys
):
    run_dir, index = copy_run(ppo_run, tmp_path)
    marker = tmp_path / "code-was-executed"
    message = damage(kind, index, marker)
    newest = ckpt.latest(run_dir / "checkpoints")

    with pytest.raises(ckpt.CheckpointError, match=re.escape(message)) as caught:
        load(run_dir)  # the Python API
    assert "\n" not in str(caught.value)
    config = make_config("ppo", "CartPole-v1", {**SMALL_PPO, "run_dir": str(tmp_path / "resumed")})
    with pytest.raises(ckpt.CheckpointError, match=re.escape(message)):
        Trainer(ALGORITHMS["ppo"], config, progress=False).train(resume=newest)
    capsys.readouterr()
    for argv in (["eval", str(run_dir)], ["train", "ppo", "--resume", str(run_dir), "--quiet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("shoal: error: ") and message in err, (argv, err)
    assert not marker.exists()  # no loader unpickled anything


def test_a_checkpoint_of_another_algorithm_is_refused(ppo_run, tmp_path, capsys):
    run_dir, index = copy_run(ppo_run, tmp_path)
    config = make_config("dqn", "CartPole-v1", {"run_dir": str(tmp_path / "dqn")})
    with pytest.raises(ckpt.CheckpointError, match=r"holds a ppo checkpoint, not dqn$"):
        Trainer(ALGORITHMS["dqn"], config, progress=False).load_checkpoint(index)
    assert main(["train", "dqn", "--resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(
        rf"shoal: error: --resume {run_dir}: that run trained '?ppo'?, not dqn$", err
    )
    # and one of another network size: refused in one line, not a traceback
    other = make_config("ppo", "CartPole-v1", {**SMALL_PPO, "hidden": (32,), "run_dir": str(tmp_path / "x")})
    with pytest.raises(
        ckpt.CheckpointError, match=r"does not fit this ppo run \(RuntimeError: .*size mismatch"
    ):
        Trainer(ALGORITHMS["ppo"], other, progress=False).load_checkpoint(index)


def test_nothing_in_shoal_unpickles_or_torch_loads_files():
    """Loading parses JSON and safetensors only; pickle is only the env workers' pipe protocol."""
    for path in (ROOT / "shoal").rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load(" not in text, path
        assert "allow_pickle=True" not in text and "yaml.load(" not in text and "unsafe_load" not in text, (
            path
        )
        if "pickle.loads(" in text:
            assert path.parent.name == "envs", path


# -- kill -9 of a whole run, then --resume --------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_of_the_whole_run_at_random_moments_then_resume_always_finishes(tmp_path):
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "shoal.cli", "train", "ppo"]
    first = ["--env", "CartPole-v1", "--total-steps", "40000", "--checkpoint-every", "4000"]
    first += ["--run-dir", str(run_dir), "--vectorization", "sync", "--eval-episodes", "2", "--quiet"]
    again = ["--resume", str(run_dir), "--quiet"]
    rng = random.Random(2026)
    log = tmp_path / "log.txt"
    at_kill = []  # the newest checkpoint when each kill landed

    def newest_steps() -> int:
        found = ckpt.latest(run_dir / "checkpoints")
        return int(found.stem.split("-")[1]) if found else -1

    for attempt in range(4):
        with open(log, "a") as out:
            proc = subprocess.Popen(
                cli + (first if attempt == 0 else again), stdout=out, stderr=out, start_new_session=True
            )
        try:
            start, deadline = time.monotonic(), time.monotonic() + 120
            if attempt == 0:  # as soon as the run directory exists: before any checkpoint
                while not (run_dir / "config.yaml").exists() and time.monotonic() < deadline:
                    time.sleep(0.005)
            elif attempt == 1:  # a moment after a checkpoint exists
                while newest_steps() < 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 1.0))
            else:  # anywhere: importing, loading the checkpoint, training, saving (but before the end)
                delay = rng.uniform(0.5, 5.0)
                while time.monotonic() - start < delay and newest_steps() < 28_000:
                    time.sleep(0.01)
            assert proc.poll() is None, f"the run ended before kill {attempt}: {log.read_text()}"
            at_kill.append(newest_steps())
            os.killpg(proc.pid, signal.SIGKILL)  # the whole run: its process group
        finally:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 10
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_members(proc.pid) == [], "a process of the killed run survived"
    print("kills landed with newest checkpoint at", at_kill)
    assert max(at_kill) > 0, at_kill  # at least one kill came after a checkpoint
    if at_kill[0] < 0:  # killed before its first checkpoint, the run was started over
        assert "no checkpoint yet, starting the run over" in log.read_text()

    done = subprocess.run(cli + again, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (at_kill, done.stderr, log.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] == 40000 and summary["episodes"] == 2
    steps = [json.loads(r)["env_steps"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40000  # no torn or repeated rows
    assert ckpt.load(run_dir)[1]["env_steps"] == 40000

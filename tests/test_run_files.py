"""Run directories and the files in them: never shared, never redirected, pruned, and a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import shoal
from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.cli import main
from shoal.run import checkpoint as ckpt
from shoal.run import rundir
from shoal.training import trainer as trainer_module
from shoal.training.trainer import Trainer
from tests.test_resume import SMALL as SMALL_RUNS
from tests.test_resume import assert_same_weights

SMALL = ["--num-envs", "2", "--num-steps", "32", "--update-epochs", "1", "--checkpoint-every", "256"]
SMALL += ["--eval-episodes", "1", "--vectorization", "sync", "--quiet"]


def train(*args: str) -> int:
    return main(["train", "ppo", *SMALL, *args])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }


def metrics_steps(run_dir: Path) -> list[int]:
    return [json.loads(r)["env_steps"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- item 5: run directories are never shared -----------------------------------------------------


class FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206
        return datetime(2026, 12, 1, 12, 0, 0)


def test_two_runs_started_in_the_same_second_get_their_own_run_dirs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer_module, "datetime", FrozenClock)  # both default names are the same
    assert train("--total-steps", "512") == 0
    assert train("--total-steps", "768", "--seed", "1") == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == [
        "CartPole-v1-ppo-s1-20261201-120000",
        "CartPole-v1-ppo-s1-20261201-120000-2",
    ]
    for run, total in zip(runs, (512, 768)):
        assert json.loads((run / "summary.json").read_text())["env_steps"] == total
        assert metrics_steps(run)[-1] == total and metrics_steps(run) == sorted(set(metrics_steps(run)))
        assert f"total_steps: {total}" in (run / "config.yaml").read_text()
        assert {p.stem for p in (run / "checkpoints").glob("*.json")} == {
            f"ckpt-{s:012d}" for s in (256, 512, 768) if s <= total
        }
    assert capsys.readouterr().out.count(f"run in {tmp_path}/runs/CartPole-v1-ppo-s1-20261201-120000") == 2


def test_concurrent_claims_never_share_a_directory(tmp_path):
    claimed: list[Path] = []
    refused: list[Exception] = []

    def claim(unique: bool) -> None:
        try:
            claimed.append(
                rundir.claim_run_dir(tmp_path / ("default" if unique else "explicit"), unique=unique)
            )
        except rundir.RunDirError as e:
            refused.append(e)

    threads = [threading.Thread(target=claim, args=(unique,)) for unique in [True] * 8 + [False] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p for p in claimed if p.name.startswith("default")}) == 8  # eight runs, eight dirs
    assert [p.name for p in claimed if p.name.startswith("explicit")] == ["explicit"]  # one run wins
    assert len(refused) == 7 and all("already holds a run" in str(e) for e in refused)


def test_an_existing_run_dir_without_resume_is_refused_in_one_line_before_anything_is_written(
    tmp_path, capsys
):
    run_dir = tmp_path / "run"
    assert train("--total-steps", "512", "--run-dir", str(run_dir)) == 0
    before = snapshot(run_dir)
    capsys.readouterr()
    for backend in (["--backend", "local"], ["--backend", "mp", "--num-workers", "2"]):
        assert (
            train("--total-steps", "1024", "--learning-rate", "0.1", "--run-dir", str(run_dir), *backend) == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"shoal: error: run directory {run_dir} already holds a run (")
        assert f"continue it with --resume {run_dir}" in err
        assert snapshot(run_dir) == before  # not a byte written, not a file touched
    with pytest.raises(rundir.RunDirError, match="already holds a run"):  # the Python API alike
        shoal.PPO("CartPole-v1", run_dir=str(run_dir), total_steps=256, num_envs=2).learn(progress=False)
    assert snapshot(run_dir) == before
    # A run of an older shoal (no marker file) is recognised by its files.
    (run_dir / rundir.MARKER).unlink()
    with pytest.raises(
        rundir.RunDirError, match=r"\(config.yaml, metrics.jsonl, summary.json, checkpoints\)"
    ):
        rundir.claim_run_dir(run_dir)
    # An empty directory, or one of other files, is free to use.
    (tmp_path / "empty").mkdir()
    assert rundir.claim_run_dir(tmp_path / "empty") == tmp_path / "empty"


def test_resume_of_a_run_without_a_checkpoint_starts_it_over_in_its_own_dir(tmp_path, capsys):
    run_dir = rundir.claim_run_dir(tmp_path / "run")  # as a run killed before its first checkpoint
    (run_dir / "config.yaml").write_text("algo: ppo\nenv: CartPole-v1\ntotal_steps: 512\n")
    assert main(["train", "ppo", "--resume", str(run_dir), "--quiet"]) == 0
    assert "no checkpoint yet, starting the run over" in capsys.readouterr().err
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == 512


@pytest.mark.slow
def test_the_launcher_claims_and_its_ranks_open_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--backend", "mp", "--num-workers", "2", "--total-steps", "512"]
    assert train(*args) == 0  # a default name
    assert train(*args, "--run-dir", "explicit") == 0
    for run in (*(tmp_path / "runs").iterdir(), tmp_path / "explicit"):
        assert (run / rundir.MARKER).exists() and metrics_steps(run)[-1] == 512
        assert json.loads((run / "summary.json").read_text())["env_steps"] == 512


# -- item 6: temporary files are created exclusively ----------------------------------------------


def plant_links(run_dir: Path, names: list[str], victims: Path) -> None:
    """At each name, a link to a victim file, and beside it one to a file that does not exist."""
    for name in names:
        victim = victims / name.replace("/", "_")
        victim.write_text("precious")
        (run_dir / name).symlink_to(victim)
        (run_dir / f"{name}.dangling").symlink_to(victims / f"absent-{victim.name}")


def test_a_link_planted_at_every_temporary_name_redirects_no_write(tmp_path):
    run_dir, victims = tmp_path / "run", tmp_path / "victims"
    run_dir.mkdir()
    victims.mkdir()
    # the names shoal used to write through, in the run directory, then in its checkpoints
    plant_links(run_dir, ["config.yaml.tmp", "metrics.jsonl.tmp", "summary.json.tmp"], victims)
    assert train("--total-steps", "512", "--run-dir", str(run_dir)) == 0
    names = [f"checkpoints/ckpt-{s:012d}.{ext}.tmp" for s in (768, 1024) for ext in ("json", "safetensors")]
    plant_links(run_dir, names, victims)
    (run_dir / "metrics.jsonl").unlink()  # and the metrics file itself, rewritten by a resume
    (run_dir / "metrics.jsonl").symlink_to(victims / "absent-metrics")
    assert main(["train", "ppo", "--resume", str(run_dir), "--total-steps", "1024", "--quiet"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == 1024
    assert all(v.read_bytes() == b"precious" for v in victims.iterdir()), "a write went through a link"
    assert not [v.name for v in victims.iterdir() if v.name.startswith("absent-")]  # nothing created
    assert not (run_dir / "metrics.jsonl").is_symlink()


def test_temporary_files_are_fresh_names_in_the_same_directory(tmp_path, monkeypatch):
    made = []
    real = ckpt.tempfile.mkstemp

    def mkstemp(**kwargs):  # noqa: ANN003, ANN202
        fd, name = real(**kwargs)
        made.append(Path(name))
        return fd, name

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", mkstemp)
    ckpt.save(tmp_path, 1, {"w": np.ones(3, np.float32), "extra/heavy/b": np.ones(2)}, {})
    ckpt.write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert len(made) == 4 and all(p.parent == tmp_path and not p.exists() for p in made)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000000001.heavy.safetensors",
        "ckpt-000000000001.json",
        "ckpt-000000000001.safetensors",
        "config.yaml",
    ]


# -- item 7: a full disk while checkpointing ------------------------------------------------------


def test_a_full_disk_while_checkpointing_is_one_line_exit_1_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, capsys
):
    real = ckpt._write_tensors
    calls = []

    def disk_full_after_the_first_checkpoint(f, arrays):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) > 1:
            f.write(b"\0" * 100)  # a part written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, arrays)

    monkeypatch.setattr(ckpt, "_write_tensors", disk_full_after_the_first_checkpoint)
    run_dir = tmp_path / "run"
    assert train("--total-steps", "1024", "--run-dir", str(run_dir)) == 1
    err = capsys.readouterr().err
    # (Besides the warning that checkpoints every 256 steps cut CartPole's episodes short.)
    err = "".join(line for line in err.splitlines(True) if not line.startswith("shoal: --checkpoint-every"))
    assert err.count("\n") == 1, err
    first = run_dir / "checkpoints" / "ckpt-000000000256.json"
    failed = first.with_name("ckpt-000000000512.safetensors")
    assert err == (
        f"shoal: error: checkpoint at env step 512 not saved: cannot write {failed}:"
        f" No space left on device (ENOSPC); the previous checkpoint {first} is kept\n"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        first.name,
        first.with_suffix(".safetensors").name,
    ]
    assert ckpt.load(run_dir)[1]["env_steps"] == 256  # whole, and the one a resume takes


# -- item 9: --keep-checkpoints, and the replay buffer in the newest checkpoint only --------------


def test_keep_checkpoints_prunes_the_oldest(tmp_path):
    for step in range(1, 7):
        ckpt.save(tmp_path / "three", step, {"w": np.full(4, step, np.float32)}, {}, keep=3)
        ckpt.save(tmp_path / "all", step, {"w": np.full(4, step, np.float32)}, {}, keep=0)
    assert sorted(p.name for p in (tmp_path / "three").iterdir()) == [
        f"ckpt-{s:012d}.{ext}" for s in (4, 5, 6) for ext in ("json", "safetensors")
    ]
    assert len(list((tmp_path / "all").glob("*.json"))) == 6
    run_dir = tmp_path / "run"
    assert train("--total-steps", "1536", "--keep-checkpoints", "2", "--run-dir", str(run_dir)) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.json")) == [
        "ckpt-000000001280.json",
        "ckpt-000000001536.json",
    ]
    assert train("--keep-checkpoints", "-1", "--run-dir", str(tmp_path / "x")) == 2


DQN = {**SMALL_RUNS["dqn"], "eval_episodes": 1, "keep_checkpoints": 0}  # tests/test_resume.py's small DQN run


def test_dqn_older_checkpoints_hold_no_replay_and_the_newest_resumes_bitwise(tmp_path):
    def dqn(run_dir: Path) -> Trainer:
        config = make_config("dqn", "CartPole-v1", {**DQN, "run_dir": str(run_dir)})
        return Trainer(ALGORITHMS["dqn"], config, progress=False)

    whole = dqn(tmp_path / "whole")
    whole.train()
    split = dqn(tmp_path / "split")
    split.train(stop_after_checkpoints=2)
    checkpoints = tmp_path / "split" / "checkpoints"
    older, newest = sorted(checkpoints.glob("*.json"))
    assert not [k for k in load_file(str(older.with_suffix(".safetensors"))) if "replay" in k]
    assert not [k for k in load_file(str(newest.with_suffix(".safetensors"))) if "replay" in k]
    assert sorted(p.name for p in checkpoints.glob("*.heavy.safetensors")) == [
        f"{newest.stem}.heavy.safetensors"
    ]
    replay = load_file(str(checkpoints / f"{newest.stem}.heavy.safetensors"))
    assert sorted(replay) == [
        f"extra/heavy/replay/{k}" for k in ("actions", "discounts", "next_obs", "obs", "returns")
    ]

    resumed = dqn(tmp_path / "split")
    with pytest.raises(ckpt.CheckpointError, match=r"heavy arrays \(a replay buffer\) were pruned") as caught:
        resumed.load_checkpoint(older)
    assert "\n" not in str(caught.value) and str(newest) in str(caught.value)
    resumed.train(resume=newest)
    assert resumed.env_steps == whole.env_steps
    assert_same_weights(whole, resumed)
    heavy = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").glob("*.heavy.*"))
    assert heavy == ["ckpt-000000003000.heavy.safetensors"]  # one replay on disk, the newest's


# -- item 8: scratch directories of a killed launcher ---------------------------------------------


def test_stale_scratch_directories_are_removed_and_live_ones_kept(tmp_path):
    mine = rundir.make_scratch_dir(base=tmp_path)
    assert mine.is_dir() and mine.name.startswith(f"shoal-group-{os.getpid()}-")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = tmp_path / f"shoal-group-{int(dead.stdout)}-abcd1234"
    (gone / "rendezvous").mkdir(parents=True)
    older = tmp_path / "shoal-group-x1y2z3"  # an older launcher's: no pid, owner unknown
    older.mkdir()
    other = tmp_path / "something-else-1"
    other.mkdir()
    assert rundir.clean_stale_scratch(base=tmp_path) == [gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, older.name, other.name])


def test_a_full_disk_while_logging_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    from shoal.run import logger

    real = logger.open_append

    def full_disk_file(path: Path):  # noqa: ANN202
        f = real(path)

        class Full:
            name = f.name

            def write(self, text: str) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def close(self) -> None:
                f.close()

        return Full()

    monkeypatch.setattr(logger, "open_append", full_disk_file)
    run_dir = tmp_path / "run"
    assert train("--total-steps", "512", "--run-dir", str(run_dir)) == 1
    err = capsys.readouterr().err
    err = "".join(line for line in err.splitlines(True) if not line.startswith("shoal: --checkpoint-every"))
    assert err == f"shoal: error: cannot append to {run_dir / 'metrics.jsonl'}: No space left on device\n"

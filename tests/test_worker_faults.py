"""Training workers killed mid-run: the launcher rebuilds the group and the run still learns."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading

import psutil
import pytest


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
    """Kills a random training worker every ``every`` seconds (jittered), ``kills`` times."""

    def __init__(self, root: int, backend: str, every: tuple[float, float], kills: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.root, self.backend, self.every, self.kills = root, backend, every, kills
        self.rng = random.Random(seed)
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while len(self.killed) < self.kills and not self.stop.wait(self.rng.uniform(*self.every)):
            ranks = training_ranks(self.root, self.backend)
            if len(ranks) < 2:  # between rebuilds, or the run is ending: try again later
                continue
            victim = self.rng.choice(ranks)
            os.kill(victim.pid, signal.SIGKILL)
            self.killed.append(victim.pid)


def chaos_run(tmp_path, backend: str, strategy: str, kills: int, every: tuple[float, float]) -> dict:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "shoal.cli", "train", "ppo", "--env", "CartPole-v1",
        "--backend", backend, "--strategy", strategy, "--num-workers", "2", "--num-envs", "4",
        "--seed", "1", "--checkpoint-every", "4096", "--run-dir", str(run_dir), "--quiet",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chaos = Chaos(proc.pid, backend, every, kills, seed=7)
    chaos.start()
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        chaos.stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(chaos.killed) >= 1, "the chaos thread killed nobody: the test proved nothing"
    assert summary["group_rebuilds"] == len(chaos.killed), (summary, chaos.killed, err[-2000:])
    assert "rebuilding the group" in err
    return summary


@pytest.mark.timeout(600)
def test_chaos_sync_on_mp_rebuilds_from_checkpoints_and_still_solves_cartpole(tmp_path):
    summary = chaos_run(tmp_path, "mp", "sync", kills=3, every=(5.0, 8.0))
    assert summary["mean_return"] >= 475, summary


@pytest.mark.timeout(600)
def test_killed_ray_worker_actor_is_replaced_and_a3c_still_solves_cartpole(tmp_path):
    summary = chaos_run(tmp_path, "ray", "a3c", kills=1, every=(12.0, 14.0))
    assert summary["mean_return"] >= 475, summary

"""Distributed training: sync all-reduce is exactly data parallelism, and it learns."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import numpy as np
import pytest
import torch
from gymnasium import spaces

from shoal.algos import PPO, PPOConfig
from shoal.launch import free_port

T, E = 16, 3  # rollout steps, envs per worker
OBS, ACT = spaces.Box(-1, 1, (4,), np.float32), spaces.Discrete(2)


def rollout(num_envs: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic rollout with episode ends and autoreset (invalid) steps."""
    rng = np.random.default_rng(seed)
    done = rng.random((T, num_envs)) < 0.15
    valid = np.ones((T, num_envs), dtype=bool)
    valid[1:][done[:-1]] = False  # the step after an episode end is a reset step
    return {
        "obs": rng.normal(size=(T, num_envs, 4)).astype(np.float32),
        "actions": rng.integers(0, 2, (T, num_envs)),
        "logprobs": np.log(rng.uniform(0.2, 0.8, (T, num_envs))).astype(np.float32),
        "values": rng.normal(size=(T, num_envs)).astype(np.float32),
        "rewards": rng.normal(size=(T, num_envs)).astype(np.float32),
        "terminated": (done & (rng.random((T, num_envs)) < 0.5)).astype(np.float32),
        "done": done.astype(np.float32),
        "valid": valid,
        "next_obs": rng.normal(size=(num_envs, 4)).astype(np.float32),
    }


def one_update(config: PPOConfig, data: dict[str, np.ndarray], strategy=None) -> list[torch.Tensor]:
    torch.manual_seed(0)  # identical initial weights everywhere
    algo = PPO(config, OBS, ACT, torch.device("cpu"), strategy)
    b = algo.buffer
    b.obs[:] = torch.from_numpy(data["obs"])
    b.actions[:] = torch.from_numpy(data["actions"])
    b.logprobs[:] = torch.from_numpy(data["logprobs"])
    b.values[:] = torch.from_numpy(data["values"])
    b._rewards[:], b._terminated[:], b._done[:], b._valid[:] = (
        data["rewards"],
        data["terminated"],
        data["done"],
        data["valid"],
    )
    b.t = T
    algo.update(data["next_obs"], 0)
    return [p.detach().clone() for p in algo.net.parameters()]


def _config(num_envs: int) -> PPOConfig:
    # One minibatch per epoch and no advantage normalisation: the setting in which
    # 2 workers x E envs must equal 1 worker x 2E envs.
    return PPOConfig(
        num_envs=num_envs,
        num_steps=T,
        num_minibatches=1,
        update_epochs=3,
        norm_adv=False,
        total_steps=10 * T * num_envs,
    )


def _sync_worker(rank: int, port: int, data: dict, results) -> None:
    import torch.distributed as dist

    from shoal.strategy import SyncStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        half = {
            k: (v[rank * E : (rank + 1) * E] if k == "next_obs" else v[:, rank * E : (rank + 1) * E])
            for k, v in data.items()
        }
        params = one_update(_config(E), half, SyncStrategy(rank, 2))
        results.put((rank, [p.numpy() for p in params]))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_sync_two_workers_equal_one_worker_with_all_the_envs():
    data = rollout(2 * E)
    assert (~data["valid"]).any() and data["valid"][:, :E].sum() != data["valid"][:, E:].sum()
    reference = one_update(_config(2 * E), data)

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_sync_worker, args=(r, port, data, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get() for _ in range(2))  # read before joining: results fill the pipe
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for rank in range(2):
        for ref, mine in zip(reference, got[rank]):
            np.testing.assert_allclose(mine, ref.numpy(), atol=1e-5, rtol=0)
    # and the update did something: weights moved from their initial values
    torch.manual_seed(0)
    init = [p.detach() for p in PPO(_config(2 * E), OBS, ACT, torch.device("cpu")).net.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(init, reference))


@pytest.mark.timeout(300)
def test_sync_on_mp_learns_cartpole(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "train",
            "ppo",
            "--env",
            "CartPole-v1",
            "--backend",
            "mp",
            "--num-workers",
            "2",
            "--num-envs",
            "4",
            "--seed",
            "1",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=290,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mean_return"] >= 475, summary
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env_steps"] == 100_000 and rows[-1]["bytes_sent"] > 0

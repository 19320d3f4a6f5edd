"""Distributed training: each strategy computes what it promises, over a real process group,
on mp and on Ray, and each learns CartPole with 2 workers."""

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
from shoal.normalize import RunningMeanStd

pytestmark = pytest.mark.slow

T, E = 16, 3  # rollout steps, envs per worker
OBS, ACT = spaces.Box(-1, 1, (4,), np.float32), spaces.Discrete(2)


def rollout(num_envs: int, seed: int = 0, all_valid: bool = False) -> dict[str, np.ndarray]:
    """A synthetic rollout with episode ends and (unless ``all_valid``) autoreset steps."""
    rng = np.random.default_rng(seed)
    done = rng.random((T, num_envs)) < 0.15
    valid = np.ones((T, num_envs), dtype=bool)
    if not all_valid:
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


def one_update(
    config: PPOConfig, data: dict[str, np.ndarray], strategy=None, sgd: bool = False
) -> list[torch.Tensor]:
    torch.manual_seed(0)  # identical initial weights everywhere
    algo = PPO(config, OBS, ACT, torch.device("cpu"), strategy)
    if sgd:
        sgd_ = torch.optim.SGD(algo.net.parameters(), lr=0.05)
        algo.learner.add("optimizer", algo.net.parameters(), sgd_, max_grad_norm=config.max_grad_norm)
    obs, rewards = torch.from_numpy(data["obs"]), data["rewards"]
    if config.normalize_obs:  # the rollout was seen (every env of every worker), then merged
        for t in range(T):
            algo.observe(data["obs"][t], data["rewards"][t], data["done"][t] > 0, data["valid"][t])
        algo.merge_statistics()
        obs, rewards = algo._obs(data["obs"]), algo._rewards(data["rewards"])
    b = algo.buffer
    b.obs[:] = obs
    b.actions[:] = torch.from_numpy(data["actions"])
    b.logprobs[:] = torch.from_numpy(data["logprobs"])
    b.values[:] = torch.from_numpy(data["values"])
    b._rewards[:], b._terminated[:], b._done[:], b._valid[:] = (
        rewards,
        data["terminated"],
        data["done"],
        data["valid"],
    )
    b.t = T
    algo.update(data["next_obs"], 0)
    stats = [torch.from_numpy(algo.normalizer.used_vector())] if config.normalize_obs else []
    return [p.detach().clone() for p in algo.net.parameters()] + stats


def _config(num_envs: int, **kwargs) -> PPOConfig:
    # One minibatch per epoch and no advantage normalisation: the setting in which
    # 2 workers x E envs must equal 1 worker x 2E envs.
    return PPOConfig(
        num_envs=num_envs,
        num_steps=T,
        num_minibatches=1,
        update_epochs=3,
        norm_adv=False,
        total_steps=10 * T * num_envs,
        **kwargs,
    )


def _in_group(rank: int, size: int, port: int, fn, args: tuple, results) -> None:
    import os
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    code = 1
    try:
        results.put((rank, fn(rank, *args)))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # as shoal's workers do: no interpreter teardown, where gloo can abort


def run_group(size: int, fn, *args) -> dict[int, object]:
    """``fn(rank, *args)`` in ``size`` spawned processes joined in a gloo group; results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_in_group, args=(r, size, port, fn, args, results)) for r in range(size)]
    for p in procs:
        p.start()
    got = dict(results.get() for _ in range(size))  # read before joining: results fill the pipe
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return got


def _worker_update(
    rank: int, data: dict, strategy_name: str, sgd: bool, max_grad_norm: float, normalize: bool = False
) -> list:
    from shoal.distributed.strategy import ParamAvgStrategy, SyncStrategy

    half = {
        k: (v[rank * E : (rank + 1) * E] if k == "next_obs" else v[:, rank * E : (rank + 1) * E])
        for k, v in data.items()
    }
    strategy = SyncStrategy(rank, 2) if strategy_name == "sync" else ParamAvgStrategy(rank, 2, sync_every=1)
    on = dict(normalize_obs=True, normalize_reward=True) if normalize else {}
    params = one_update(_config(E, max_grad_norm=max_grad_norm, **on), half, strategy, sgd=sgd)
    return [p.numpy() for p in params]


def _sync_with_and_without_normalisation(rank: int, data: dict, scaled: dict) -> tuple[list, list]:
    return _worker_update(rank, data, "sync", False, 0.5), _worker_update(
        rank, scaled, "sync", False, 0.5, True
    )


@pytest.mark.timeout(120)
def test_sync_two_workers_equal_one_worker_with_all_the_envs():
    data = rollout(2 * E)
    assert (~data["valid"]).any() and data["valid"][:, :E].sum() != data["valid"][:, E:].sum()
    # With normalisation, each worker counts its own envs; merged after the update, the
    # statistics (hence the normalised observations and scaled rewards) are those of one
    # worker that saw them all. (Observations on very different scales, so that it matters.)
    scaled = dict(data, obs=data["obs"] * np.float32([1, 10, 100, 0.1]) + np.float32([3, -20, 0, 1]))
    reference = one_update(_config(2 * E), data)
    normalized = one_update(_config(2 * E, normalize_obs=True, normalize_reward=True), scaled)
    got = run_group(2, _sync_with_and_without_normalisation, data, scaled)
    for rank in range(2):
        plain, (*params, stats) = got[rank]
        for ref, mine in zip(reference, plain):
            np.testing.assert_allclose(mine, ref.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(stats, normalized[-1].numpy(), rtol=1e-6, atol=0)
        for ref, mine in zip(normalized[:-1], params):
            np.testing.assert_allclose(mine, ref.numpy(), atol=1e-5, rtol=0)
    assert normalized[-1][0] == T * 2 * E  # every observation of both workers was counted
    # and the update did something: weights moved from their initial values
    torch.manual_seed(0)
    init = [p.detach() for p in PPO(_config(2 * E), OBS, ACT, torch.device("cpu")).net.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(init, reference))
    assert any(not torch.allclose(a, b) for a, b in zip(reference, normalized))


@pytest.mark.timeout(120)
def test_param_avg_with_sgd_and_k1_equals_sync_with_sgd():
    """theta - lr * mean_i(g_i) == mean_i(theta - lr * g_i): averaging every step is sync SGD."""
    data = rollout(2 * E, seed=3, all_valid=True)  # equal sample counts: sync's weighting is a plain mean
    no_clip = 1e9  # each worker clipping its own gradient is not clipping the mean
    sync = run_group(2, _worker_update, data, "sync", True, no_clip)
    avg = run_group(2, _worker_update, data, "param-avg", True, no_clip)
    reference = one_update(_config(2 * E, max_grad_norm=no_clip), data, sgd=True)
    for rank in range(2):
        for s, a, ref in zip(sync[rank], avg[rank], reference):
            np.testing.assert_allclose(a, s, atol=1e-6, rtol=0)
            np.testing.assert_allclose(a, ref.numpy(), atol=1e-5, rtol=0)


def _average_with_a_target(rank: int) -> list:
    from shoal.distributed.strategy import ParamAvgStrategy

    torch.manual_seed(0)
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.1)
    strategy = ParamAvgStrategy(rank, 2, sync_every=1)
    strategy.start({"q": online, "q_target": target}, {"optimizer": optimizer})
    with torch.no_grad():  # each worker's target drifts its own way (a copy of its own online net)
        for p in target.parameters():
            p.fill_(float(rank + 1))
    online(torch.ones(1, 2)).sum().backward()
    strategy.step(optimizer)  # K = 1: this step ends with an average
    return [p.detach().numpy().copy() for p in target.parameters()]


@pytest.mark.timeout(120)
def test_param_avg_averages_target_networks_with_the_trained_weights():
    """theta = mean theta_i for every weight of the agent: a target network no optimizer steps
    is averaged too, or each worker's target keeps tracking only its own drifted weights."""
    got = run_group(2, _average_with_a_target)
    for rank in range(2):
        for p in got[rank]:
            np.testing.assert_array_equal(p, np.full_like(p, 1.5))


PS_OBS = [np.arange(6.0).reshape(3, 2), np.arange(8.0).reshape(4, 2) ** 2]  # each worker's observations


def _ps_rank(rank: int, store: str, mode: str, grads: list, samples: list, pipelined: bool = False) -> tuple:
    """Ranks 0 and 1 push one known gradient each; rank 2 is the parameter server (SGD, lr 1)."""
    from shoal.distributed.link import WORKER, Link, announce, open_store
    from shoal.distributed.server import ParameterServer
    from shoal.distributed.strategy import ServerStrategy, flat_params
    from shoal.normalize import Normalizer

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    norm = Normalizer((2,), 1, obs=True, reward=False)  # the statistics travel with pushes and answers
    if rank == 2:
        server = ParameterServer(optimizer, 2, mode, normalizer=norm)
        stats = server.serve(open_store(f"file://{store}", host=True))
        assert stats["pushes"] == 2 and stats["version"] == (2 if mode == "async" else 1)
        return flat_params(list(net.parameters())).tolist(), norm.used_vector().tolist()
    torch.manual_seed(rank + 1)  # a worker's own copy may differ: the server greets it with its weights
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    opened = open_store(f"file://{store}", host=False)
    announce(opened, rank, 0)
    link = Link(opened, rank, 0, WORKER)
    strategy = ServerStrategy(rank, 2, pipelined=pipelined, link=link)
    strategy.start({"net": net}, {"optimizer": optimizer}, norm)
    norm.observe(PS_OBS[rank])
    for p, g in zip(net.parameters(), torch.as_tensor(grads[rank]).split([6, 2])):
        p.grad = g.view_as(p).clone()
    strategy.reduce_gradients(net, samples=samples[rank])
    strategy.step(optimizer)
    if pipelined:  # the answer is still in flight: nothing applied to our copy yet
        assert strategy.in_flight is not None and strategy.version == 0
    strategy.finish()
    return flat_params(list(net.parameters())).tolist(), norm.used_vector().tolist()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async", "sync", "pipelined"])
def test_parameter_server_applies_exactly_the_pushed_gradients(mode, tmp_path):
    torch.manual_seed(0)
    start = torch.nn.utils.parameters_to_vector(torch.nn.Linear(3, 2).parameters()).detach().numpy()
    grads = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    samples = [1, 3]
    pipelined = mode == "pipelined"
    store = str(tmp_path / "store")
    ran = run_group(3, _ps_rank, store, "async" if pipelined else mode, grads.tolist(), samples, pipelined)
    got = {rank: weights for rank, (weights, _) in ran.items()}
    server = np.array(got[2])
    # The server merged both workers' statistics; the chief ends with them (the final weights).
    union = RunningMeanStd((2,))
    union.update(np.concatenate(PS_OBS))
    np.testing.assert_allclose(ran[2][1][: union.size], union.vector(), rtol=1e-6)  # (then: no returns)
    np.testing.assert_array_equal(ran[0][1], ran[2][1])
    if mode == "sync":  # both answers came after the round: everyone's
        np.testing.assert_array_equal(ran[1][1], ran[2][1])
    if mode != "sync":  # each push applied on its own, in whatever order they came
        np.testing.assert_allclose(server, start - grads[0] - grads[1], atol=1e-6)
        # A worker holds the global weights as of its own push: after one or both pushes.
        possible = [server, start - grads[0], start - grads[1]]
        for rank in range(2):
            assert any(np.allclose(got[rank], p, atol=1e-6) for p in possible), rank
    else:  # one update with the sample-weighted mean, and both workers hold it
        expected = start - (grads[0] * samples[0] + grads[1] * samples[1]) / sum(samples)
        np.testing.assert_allclose(server, expected, atol=1e-6)
        for rank in range(2):
            np.testing.assert_allclose(np.array(got[rank]), server, atol=0)


def shoal_train(*args: str, timeout: float = 500) -> subprocess.CompletedProcess:
    """``shoal train ...`` in a fresh process, as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "train", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# Each strategy learns CartPole with 2 workers and shoal's defaults, seed fixed in advance (1).
# Most cases run with faults on top, in tests/test_worker_faults.py: sync and a3c PPO on mp
# (workers killed), each solving CartPole (>= 475) and checking what the case below checks; on
# Ray the same kills without the solve. Here: what no fault test covers, the asynchronous
# parameter server. Parameter-averaged DQN runs bitwise the same on mp and on Ray (below);
# its learning, 2 workers against 1, is measured by ``shoal bench zoo --part distributed``.
# a3c runs PPO, not A2C: asynchronous A2C (pipelined, constant or annealed learning rate) ended
# at 500 in most runs but below 475 in 2 of 9, which timing decides; asynchronous PPO, whose
# CartPole preset anneals learning rate and clip range, reached 500 in every run tried.
LEARNS = [
    ("mp", "ppo", "param-server", ["--num-envs", "4"]),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("backend", "algo", "strategy", "extra"), LEARNS)
def test_each_strategy_learns_cartpole_with_two_workers(backend, algo, strategy, extra, tmp_path):
    run_dir = tmp_path / "run"
    shoal_train(
        algo,
        "--env",
        "CartPole-v1",
        "--backend",
        backend,
        "--strategy",
        strategy,
        "--num-workers",
        "2",
        "--seed",
        "1",
        "--run-dir",
        str(run_dir),
        *extra,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mean_return"] >= 475, summary
    check_two_worker_run(run_dir, summary, backend, strategy)


def check_two_worker_run(run_dir, summary: dict, backend: str, strategy: str) -> None:
    """What every 2-worker run shows, faults or not: both workers stepped, bytes went out, on
    a parameter server every row after the first carries the policy lag, on Ray both ranks
    name their node."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bytes_sent"] > 0 and rows[-1]["sps_worker_1"] > 0
    if strategy in ("a3c", "param-server"):
        assert summary["parameter_server"]["pushes"] > 0
        assert all("policy_lag" in r for r in rows if r["env_steps"] > rows[0]["env_steps"])
    if backend == "ray":
        assert {"0", "1"} <= set(summary["nodes"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("algo", "strategy", "steps", "extra"),
    [("ppo", "sync", 8192, ["--num-envs", "4"]), ("dqn", "param-avg", 3000, [])],
)
def test_mp_and_ray_end_with_identical_parameters(algo, strategy, steps, extra, tmp_path):
    """The same run on either backend is bitwise the same run: Ray only places the ranks.
    (DQN's param-avg learning to 500 on CartPole, 2 workers vs 1, is in ``shoal bench zoo
    --part distributed``; mp's param-avg is also stopped with a signal in test_group_signals.)"""
    from shoal.run import checkpoint as ckpt

    weights = {}
    for backend in ("mp", "ray"):
        run_dir = tmp_path / backend
        shoal_train(
            algo,
            "--backend",
            backend,
            "--strategy",
            strategy,
            "--num-workers",
            "2",
            *extra,
            "--total-steps",
            str(steps),
            "--seed",
            "3",
            "--eval-episodes",
            "1",
            "--run-dir",
            str(run_dir),
        )
        summary = json.loads((run_dir / "summary.json").read_text())
        check_two_worker_run(run_dir, summary, backend, strategy)
        arrays, _ = ckpt.load(run_dir)
        weights[backend] = {k: v for k, v in arrays.items() if k.startswith("model/")}
    assert weights["mp"].keys() == weights["ray"].keys() and weights["mp"]
    for key, value in weights["mp"].items():
        np.testing.assert_array_equal(weights["ray"][key], value, err_msg=key)


@pytest.mark.timeout(300)
def test_ray_cluster_of_two_nodes_spreads_workers_and_trains(tmp_path):
    """Two Ray nodes on loopback with one CPU each: one worker lands on each, training goes on."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        node_ids = {node.node_id for node in cluster.list_all_nodes()}
        assert len(node_ids) == 2
        run_dir = tmp_path / "run"
        shoal_train(
            "ppo",
            "--backend",
            "ray",
            "--ray-address",
            cluster.address,
            "--num-workers",
            "2",
            "--num-envs",
            "4",
            "--total-steps",
            "24576",
            "--eval-episodes",
            "2",
            "--run-dir",
            str(run_dir),
        )
    finally:
        cluster.shutdown()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {summary["nodes"]["0"], summary["nodes"]["1"]} == node_ids  # one worker on each node
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    returns = [r["episode_return"] for r in rows if "episode_return" in r]
    assert rows[-1]["env_steps"] == 24576
    assert np.mean(returns[-3:]) > 3 * returns[0], returns  # it is learning (sync: deterministic)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["sync", "a3c"])
def test_distributed_runs_resume_evaluate_and_plot_like_local_ones(strategy, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--backend", "mp", "--num-workers", "2", "--strategy", strategy, "--eval-episodes", "2"]
    shoal_train("a2c", *common, "--total-steps", "8000", "--run-dir", str(run_dir))
    shoal_train("a2c", "--resume", str(run_dir), "--total-steps", "16000")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["env_steps"] for r in rows]
    assert steps == sorted(steps) and steps[-1] == 16000  # continued from 8000, no rows twice
    assert (run_dir / "checkpoints" / f"ckpt-{16000:012d}.json").exists()
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "eval", str(run_dir), "--episodes", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["episodes"] == 2, done.stderr
    png = tmp_path / "curves.png"
    done = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "plot", str(run_dir), "-o", str(png)],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0 and png.stat().st_size > 10_000, done.stderr

"""NaN and inf: caught in observations, rewards, loss and gradients before they reach the weights.

Every fault is injected for real: an env that returns NaN observations or an inf (or a float32-
overflowing) reward at a chosen step, or a backward hook that makes a gradient NaN.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.cli import main
from shoal.distributed.server import ParameterServer
from shoal.distributed.strategy import LocalStrategy, ParamAvgStrategy, SyncStrategy, trained_params
from shoal.guards import NonFiniteError
from shoal.nn import clip_grad_norm
from shoal.run import checkpoint as ckpt
from shoal.training.trainer import Trainer


class NonFiniteCartPole(gym.Wrapper):
    """CartPole in which env ``i`` (known from its first reset's seed) misbehaves at its own step ``at``.

    ``faults`` maps an env index to (kind, at): ``obs`` returns NaN observations from then
    until its episode ends (a physics state gone NaN), ``reward`` returns one +inf reward,
    ``huge`` one reward of 1e39: finite here, inf once stored as float32, so it poisons the loss.
    """

    def __init__(self, faults: dict[int, tuple[str, int]], base_seed: int = 1) -> None:
        super().__init__(gym.make("CartPole-v1"))
        self.faults, self.base_seed = faults, base_seed
        self.index: int | None = None
        self.steps = 0
        self.broken = False

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        if seed is not None and self.index is None:
            self.index = (seed - self.base_seed) % 10_007  # env i: seed + i (+ 10_007 k after boundary k)
        self.broken = False
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        kind, at = self.faults.get(self.index, (None, -1))
        if self.steps == at:
            if kind == "obs":
                self.broken = True
            else:
                reward = math.inf if kind == "reward" else 1e39
        if self.broken:
            obs = np.full_like(obs, np.nan)
        return obs, reward, terminated, truncated, info


SMALL = {
    "ppo": dict(num_envs=4, num_steps=32, num_minibatches=1, update_epochs=2, total_steps=4096),
    "a2c": dict(num_envs=4, num_steps=5, total_steps=2000),
    "dqn": dict(
        num_envs=2,
        total_steps=3000,
        learning_starts=200,
        train_freq=50,
        gradient_steps=5,
        target_update_interval=100,
        buffer_size=2000,
    ),
}
EVERY = {"ppo": 512, "a2c": 500, "dqn": 500}  # checkpoint_every


def make_trainer(algo: str, tmp_path, faults: dict, policy: str) -> Trainer:
    overrides = {
        **SMALL[algo],
        "checkpoint_every": EVERY[algo],
        "run_dir": str(tmp_path / "run"),
        "eval_episodes": 1,
        "vectorization": "sync",
        "nan_policy": policy,
    }
    config = make_config(algo, "CartPole-v1", overrides)
    env_fn = functools.partial(NonFiniteCartPole, faults, config.seed)
    return Trainer(ALGORITHMS[algo], config, env_fn=env_fn, progress=False)


def poison_gradient(trainer: Trainer, module: str, param: str, at_update: int) -> None:
    """A backward hook that turns the gradient of ``module.param`` into NaN during update ``at_update``."""
    p = dict(trainer.algo.modules()[module].named_parameters())[param]
    p.register_hook(lambda g: torch.full_like(g, math.nan) if trainer.algo.updates == at_update else None)


def trained(trainer: Trainer) -> list[torch.Tensor]:
    (optimizer,) = trainer.algo.optimizers().values()
    return [p.detach().clone() for p in trained_params(optimizer)]


def model_arrays(path) -> dict[str, np.ndarray]:
    arrays, _ = ckpt.load(path)
    return {k: v for k, v in arrays.items() if k.startswith("model/")}


GRAD_PPO = "gradient of net.actor_head.weight is nan at env step 1,280"
GRAD_A2C = "gradient of net.critic_head.weight is nan at env step 820"
RAISE = [  # algo, faults, gradient hook (module, param, update), message, last good checkpoint
    ("ppo", {3: ("obs", 300)}, None, "observation of env 3 is nan at env step 1,260", 1024),
    ("ppo", {3: ("reward", 300)}, None, "reward of env 3 is inf at env step 1,260", 1024),
    ("ppo", {3: ("huge", 300)}, None, "loss is nan at env step 1,280", 1024),
    ("ppo", {}, ("net", "actor_head.weight", 9), GRAD_PPO, 1024),
    ("a2c", {}, ("net", "critic_head.weight", 40), GRAD_A2C, 500),
    ("dqn", {1: ("obs", 700)}, None, "observation of env 1 is nan at env step 1,526", 1500),
    ("dqn", {}, ("q", "head.weight", 25), "gradient of q.head.weight is nan at env step 1,450", 1000),
]


@pytest.mark.parametrize(("algo", "faults", "hook", "message", "last"), RAISE)
def test_raise_names_the_source_and_keeps_the_last_good_checkpoint(
    tmp_path, algo, faults, hook, message, last
):
    trainer = make_trainer(algo, tmp_path, faults, "raise")
    if hook:
        poison_gradient(trainer, *hook)
    written: dict[str, tuple[bytes, bytes]] = {}  # every checkpoint's bytes, as saved
    save = trainer.save_checkpoint

    def spy_save():
        path = save()
        written[path.name] = (path.read_bytes(), path.with_suffix(".safetensors").read_bytes())
        return path

    trainer.save_checkpoint = spy_save
    after_update: list[list[torch.Tensor]] = []
    with pytest.raises(NonFiniteError) as caught:
        trainer.train(on_update=lambda t: after_update.append(trained(t)) and False)

    text = str(caught.value)
    expected = tmp_path / "run" / "checkpoints" / f"ckpt-{last:012d}.json"
    assert text.startswith(message), text
    assert text.endswith(f"last good checkpoint: {expected}") and "\n" not in text
    # Nothing was written after the fault, and what was written before is untouched and finite.
    assert ckpt.latest(expected.parent) == expected
    assert sorted(p.name for p in expected.parent.glob("ckpt-*.json")) == sorted(written)
    for name, (index, weights) in written.items():
        path = expected.parent / name
        assert path.read_bytes() == index and path.with_suffix(".safetensors").read_bytes() == weights
        assert all(np.isfinite(v).all() for v in model_arrays(path).values())
    assert not (tmp_path / "run" / "summary.json").exists()
    # The update that met the fault did not change a weight: they are those of the last update.
    for now, before in zip(trained(trainer), after_update[-1], strict=True):
        assert torch.equal(now, before)


def metric_rows(trainer: Trainer) -> list[dict]:
    return [json.loads(r) for r in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_skip_ppo_drops_bad_steps_and_updates_counts_them_and_finishes(tmp_path):
    # env 3: NaN observations from env step 1,260 to its episode's end;
    # env 1: a 1e39 reward at its step 500 (the loss of that rollout is NaN: 2 epochs skipped);
    # update 9: a NaN gradient (2 epochs skipped).
    # env 2: an inf reward at its step 400 (quarantined like env 3: no update skipped for it);
    trainer = make_trainer("ppo", tmp_path, {3: ("obs", 300), 2: ("reward", 400), 1: ("huge", 500)}, "skip")
    poison_gradient(trainer, "net", "actor_head.weight", 9)
    summary = trainer.train()

    rows = metric_rows(trainer)
    assert summary["env_steps"] == 4096 and (trainer.run_dir / "summary.json").exists()
    assert rows[-1]["nonfinite_skipped_updates"] == 4  # exactly the poisoned ones
    assert rows[-1]["nonfinite_skipped_steps"] >= 1
    assert all(r["nonfinite_skipped_steps"] == 0 for r in rows if r["env_steps"] < 1260)
    # The quarantined env's data never reached the loss: its update was not skipped, and
    # every logged loss and episode return is finite.
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("episode_return", "value_loss") if k in r), r
    assert all(p.isfinite().all() for p in trained(trainer))
    final = ckpt.latest(trainer.run_dir / "checkpoints")
    assert all(np.isfinite(v).all() for v in model_arrays(final).values())


def test_skip_dqn_drops_bad_steps_and_updates_counts_them_and_finishes(tmp_path):
    # env 1: NaN observations from env step 1,526; env 0: a 1e39 reward at its step 600,
    # an inf return in the replay buffer whenever a batch samples it; update 25: NaN gradients.
    trainer = make_trainer("dqn", tmp_path, {1: ("obs", 700), 0: ("huge", 600)}, "skip")
    poison_gradient(trainer, "q", "head.weight", 25)
    trainer.train()

    rows = metric_rows(trainer)
    assert (trainer.run_dir / "summary.json").exists()
    assert rows[-1]["nonfinite_skipped_updates"] > 5  # the 5 steps of update 25, and the inf return's
    assert rows[-1]["nonfinite_skipped_steps"] >= 1
    assert not np.isnan(trainer.algo.replay.obs).any()  # no quarantined step entered the buffer
    assert all(p.isfinite().all() for p in trained(trainer))
    final = ckpt.latest(trainer.run_dir / "checkpoints")
    assert all(np.isfinite(v).all() for v in model_arrays(final).values())


# -- the check itself ---------------------------------------------------------------------------


def _net_and_adam() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return net, torch.optim.Adam(net.parameters(), lr=0.1)


def _backward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    loss = net(x).pow(2).mean()
    loss.backward()
    return loss


def test_skip_changes_neither_weights_nor_optimizer_state():
    net, optimizer = _net_and_adam()
    strategy = LocalStrategy()
    strategy.watch({"net": net}, "skip")
    loss = _backward(net, torch.ones(5, 3))
    strategy.step(optimizer, loss, clip_grad_norm(net.parameters(), 1.0))  # a normal step first
    weights = [p.detach().clone() for p in net.parameters()]
    moments = {k: v.clone() for k, v in optimizer.state[net[2].weight].items()}

    loss = _backward(net, torch.tensor([[1.0, math.nan, 0.0]]))
    strategy.step(optimizer, loss, clip_grad_norm(net.parameters(), 1.0))
    assert strategy.nonfinite_skipped == 1 and strategy.steps == 1
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), weights))
    assert all(torch.equal(optimizer.state[net[2].weight][k], v) for k, v in moments.items())
    assert all(p.grad is None for p in net.parameters())  # nothing left to leak into the next step


def test_raise_names_the_parameter_or_the_loss():
    net, optimizer = _net_and_adam()
    strategy = LocalStrategy()
    strategy.watch({"net": net}, "raise")
    loss = _backward(net, torch.ones(2, 3))
    net[2].bias.grad[0] = math.inf
    norm = clip_grad_norm(net.parameters(), 0.5)
    assert torch.isfinite(net[0].weight.grad).all()  # clipping did not spread the inf to the others
    with pytest.raises(NonFiniteError, match=r"^gradient of net\.2\.bias is inf$"):
        strategy.step(optimizer, loss, norm)
    # A loss that is inf while the gradients are finite (a Huber loss against an inf target)
    optimizer.zero_grad()
    loss = _backward(net, torch.ones(2, 3))
    with pytest.raises(NonFiniteError, match=r"^loss is inf$"):
        strategy.step(optimizer, loss + math.inf, clip_grad_norm(net.parameters(), 0.5))
    # ... but a synchronous group decides on the reduced gradients alone, the same on every worker.
    sync = SyncStrategy(0, 1)
    sync.watch({"net": net}, "raise")
    sync.step(optimizer, loss + math.inf, clip_grad_norm(net.parameters(), 0.5))
    assert sync.steps == 1


def test_finite_clipping_is_unchanged():
    net, _ = _net_and_adam()
    _backward(net, torch.full((4, 3), 3.0))
    grads = [p.grad.clone() for p in net.parameters()]
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    scale = torch.clamp(0.1 / (total + 1e-6), max=1.0)
    assert scale < 1  # it does clip
    clip_grad_norm(net.parameters(), 0.1)
    for p, g in zip(net.parameters(), grads):
        assert torch.equal(p.grad, g * scale)


def test_param_avg_keeps_its_schedule_through_skipped_steps():
    """Workers average every K step calls, skipped or not, or their collectives would not meet."""
    net, optimizer = _net_and_adam()
    strategy = ParamAvgStrategy(0, 1, sync_every=2)
    strategy.watch({"net": net}, "skip")
    averaged_at = []
    strategy.average = lambda: averaged_at.append(strategy.calls)
    for call in range(1, 5):
        optimizer.zero_grad()
        loss = _backward(net, torch.tensor([[math.nan if call == 2 else 1.0, 0.0, 0.0]]))
        strategy.step(optimizer, loss, clip_grad_norm(net.parameters(), 1.0))
    assert averaged_at == [2, 4] and strategy.steps == 3 and strategy.nonfinite_skipped == 1


def test_parameter_server_applies_nothing_for_a_skipped_push():
    for mode in ("async", "sync"):
        net, _ = _net_and_adam()
        server = ParameterServer(torch.optim.SGD(net.parameters(), lr=1.0), 2, mode)
        before = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
        n = before.numel()
        accepted, _ = server.push(torch.zeros(n), 0, 1.0, 0)
        if mode == "sync":
            server.push(torch.zeros(n), 0, 1.0, 0)
            server.apply_round()  # every worker skipped: no step
            server.push(torch.zeros(n), 0, 1.0, 0)
            server.push(torch.ones(n), 3, 1.0, 0)
            server.apply_round()  # the mean of the others only
            expected = before - 1.0
        else:
            expected = before
        assert accepted and server.version == (1 if mode == "sync" else 0)
        assert torch.allclose(torch.nn.utils.parameters_to_vector(net.parameters()), expected)


def _sync_rank(rank: int, policy: str) -> dict:
    """Three steps of a 2-worker sync group; rank 1's second gradient is NaN."""
    net, optimizer = _net_and_adam()
    strategy = SyncStrategy(rank, 2)
    strategy.watch({"net": net}, policy)
    try:
        for step in range(3):
            optimizer.zero_grad()
            x = torch.full((2, 3), math.nan if (rank, step) == (1, 1) else float(rank + 1))
            loss = _backward(net, x)
            strategy.reduce_gradients(net, samples=2)
            strategy.step(optimizer, loss, clip_grad_norm(net.parameters(), 1.0))
    except NonFiniteError as e:
        return {"error": str(e), "steps": strategy.steps}
    weights = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    return {"weights": weights.tolist(), "steps": strategy.steps, "skipped": strategy.nonfinite_skipped}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sync_workers_decide_together_after_the_all_reduce():
    from tests.test_distributed import run_group

    skip = run_group(2, _sync_rank, "skip")
    for rank in range(2):  # rank 0's own gradient was finite, yet it skipped with rank 1
        assert skip[rank]["steps"] == 2 and skip[rank]["skipped"] == 1
        assert np.isfinite(skip[rank]["weights"]).all()
    assert skip[0]["weights"] == skip[1]["weights"]
    stop = run_group(2, _sync_rank, "raise")  # both stop at the same step: no worker waits forever
    assert stop == {
        0: {"error": "gradient of net.0.weight is nan", "steps": 1},  # the sum everyone got
        1: {"error": "loss is nan", "steps": 1},  # where it came from
    }


# -- through the command line --------------------------------------------------------------------

gym.register("shoal-test/NaNCartPole-v0", entry_point=NonFiniteCartPole, kwargs={"faults": {3: ("obs", 300)}})


def test_cli_stops_with_one_line_exit_1_and_the_last_good_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(
        ["train", "ppo", "--env", "shoal-test/NaNCartPole-v0", "--num-envs", "4", "--num-steps", "32"]
        + ["--num-minibatches", "1", "--update-epochs", "2", "--total-steps", "4096"]
        + ["--checkpoint-every", "512", "--vectorization", "sync", "--eval-episodes", "1", "--quiet"]
        + ["--run-dir", str(run_dir)]
    )
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("shoal: error")]
    last = run_dir / "checkpoints" / "ckpt-000000001024.json"
    assert lines == [
        "shoal: error: observation of env 3 is nan at env step 1,260; training stopped before the"
        f" weights changed; last good checkpoint: {last}"
    ]
    assert "Traceback" not in err
    # and --nan-policy skip finishes the same run
    code = main(["train", "ppo", "--resume", str(run_dir), "--nan-policy", "skip", "--quiet"])
    assert code == 0 and (run_dir / "summary.json").exists()
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env_steps"] == 4096 and rows[-1]["nonfinite_skipped_steps"] >= 1

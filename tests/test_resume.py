"""Exact resume and determinism: the same seed gives bitwise the same weights."""

from __future__ import annotations

import pytest
import torch

from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.run.checkpoint import latest
from shoal.training.trainer import Trainer

SMALL = {
    "ppo": dict(num_envs=4, num_steps=64, total_steps=4096, checkpoint_every=1024, update_epochs=2),
    "a2c": dict(num_envs=4, num_steps=5, total_steps=2000, checkpoint_every=500),
    "dqn": dict(
        num_envs=2,
        total_steps=3000,
        checkpoint_every=1000,
        learning_starts=200,
        train_freq=50,
        gradient_steps=5,
        n_step=3,
        target_update_interval=100,
        buffer_size=2000,
    ),
    # SAC and TD3 act on Pendulum; several gradient steps per phase, TD3's delayed actor
    # updates falling across checkpoint boundaries, targets moving every step
    "sac": dict(
        total_steps=1200,
        checkpoint_every=300,
        learning_starts=100,
        train_freq=8,
        gradient_steps=2,
        batch_size=16,
        hidden=(8,),
        buffer_size=1000,
    ),
    "td3": dict(
        num_envs=2,
        total_steps=1200,
        checkpoint_every=400,
        learning_starts=100,
        train_freq=8,
        gradient_steps=2,
        policy_delay=3,  # a resume that lost the count would move the actor updates
        batch_size=16,
        hidden=(8,),
        buffer_size=1000,
    ),
}
ENV = {"sac": "Pendulum-v1", "td3": "Pendulum-v1"}  # the others: CartPole-v1


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        f"{m}.{k}": v.clone()
        for m, mod in trainer.algo.modules().items()
        for k, v in mod.state_dict().items()
    }


def run(algo: str, run_dir, **overrides) -> Trainer:
    config = make_config(
        algo,
        ENV.get(algo, "CartPole-v1"),
        {**SMALL[algo], "run_dir": str(run_dir), "eval_episodes": 1, **overrides},
    )
    return Trainer(ALGORITHMS[algo], config, progress=False)


def assert_same_weights(a: Trainer, b: Trainer) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


def test_interrupted_then_resumed_run_ends_with_the_same_parameters(tmp_path):
    for algo in ("ppo", "dqn", "a2c", "sac", "td3"):
        whole = run(algo, tmp_path / f"{algo}-whole")
        whole.train()

        first = run(algo, tmp_path / f"{algo}-split")
        first.train(stop_after_checkpoints=2)  # the "crash": nothing after checkpoint 2 is kept
        assert first.env_steps < SMALL[algo]["total_steps"]
        resumed = run(algo, tmp_path / f"{algo}-split")
        resumed.train(resume=latest(tmp_path / f"{algo}-split" / "checkpoints"))
        assert resumed.env_steps == whole.env_steps
        assert_same_weights(whole, resumed)


def test_same_seed_same_weights_in_process_or_in_env_workers(tmp_path):
    sync = run("ppo", tmp_path / "sync", vectorization="sync", total_steps=2048)
    sync.train()
    for workers in (1, 2):
        proc = run(
            "ppo", tmp_path / f"proc{workers}", vectorization="process", env_workers=workers, total_steps=2048
        )
        proc.train()
        assert_same_weights(sync, proc)
    other = run("ppo", tmp_path / "other", vectorization="sync", total_steps=2048, seed=2)
    other.train()
    assert not torch.equal(weights(sync)["net.actor_head.weight"], weights(other)["net.actor_head.weight"])


@pytest.mark.slow
def test_exact_resume_with_normalisation_restores_the_statistics(tmp_path):
    """Observation and return statistics (merged, unmerged, each env's running return) are
    saved with the weights: a resumed run normalises exactly as the uninterrupted one."""
    on = dict(normalize_obs=True, normalize_reward=True)
    for algo in ("ppo", "dqn"):
        whole = run(algo, tmp_path / f"{algo}-whole", **on)
        whole.train()
        first = run(algo, tmp_path / f"{algo}-split", **on)
        first.train(stop_after_checkpoints=2)
        resumed = run(algo, tmp_path / f"{algo}-split", **on)
        resumed.train(resume=latest(tmp_path / f"{algo}-split" / "checkpoints"))
        assert_same_weights(whole, resumed)
        a, b = whole.algo.normalizer, resumed.algo.normalizer
        assert a.used[0].count > 0 and a.used[1].count > 0
        assert (a.used_vector() == b.used_vector()).all() and (a.returns == b.returns).all()

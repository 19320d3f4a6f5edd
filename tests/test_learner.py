"""The learner takes every optimizer step: the same math as the algorithms' own code before."""

from __future__ import annotations

import hashlib

import pytest
import torch

from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.distributed.strategy import LocalStrategy
from shoal.nn import clip_grad_norm
from shoal.training.learner import Learner
from shoal.training.trainer import Trainer

# sha256 (first 16 hex digits) of every module's weights after these short runs, taken with
# the code before the learner and the callback loop existed (commit 14d59a9, where each
# algorithm wrote zero_grad/backward/reduce/clip/step and its learning-rate schedule itself).
BEFORE = {
    "ppo": ("CartPole-v1", dict(num_envs=4, num_steps=64, checkpoint_every=1024), "1497e4ba5b9cb2fe"),
    "a2c": ("CartPole-v1", dict(num_envs=4, num_steps=8, checkpoint_every=1024), "51e97082aa9248dd"),
    "dqn": (
        "CartPole-v1",
        dict(
            num_envs=2, learning_starts=256, train_freq=16, gradient_steps=4, checkpoint_every=1024, n_step=3
        ),
        "8dd748347beb3d6b",
    ),
    "ppo-pendulum": (
        "Pendulum-v1",
        dict(num_envs=2, num_steps=256, checkpoint_every=1024),
        "39969ee1ebea9fb7",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(BEFORE))
def test_training_gives_bitwise_the_weights_it_gave_before_the_learner(tmp_path, run):
    algo = run.split("-")[0]
    env, settings, digest = BEFORE[run]
    overrides = dict(
        settings, total_steps=4096, vectorization="sync", eval_episodes=1, run_dir=str(tmp_path / "r")
    )
    trainer = Trainer(ALGORITHMS[algo], make_config(algo, env, overrides), progress=False)
    trainer.train()
    h = hashlib.sha256()
    for module in trainer.algo.modules().values():
        for tensor in module.state_dict().values():
            h.update(tensor.detach().numpy().tobytes())
    assert h.hexdigest()[:16] == digest


class Recording(LocalStrategy):
    """A strategy that records what the learner asks of it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def reduce_gradients(self, params, samples=1):  # noqa: ANN001
        self.calls.append(("reduce", samples))

    def apply(self, optimizer):  # noqa: ANN001
        self.calls.append(("apply", id(optimizer)))
        super().apply(optimizer)


def test_several_optimizers_each_step_like_the_hand_written_sequence():
    torch.manual_seed(0)
    actor, critic = torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)
    twins = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 1)]
    for mine, twin in zip((actor, critic), twins):
        twin.load_state_dict(mine.state_dict())
    strategy = Recording()
    learner = Learner(strategy)
    a_opt = learner.add(
        "actor", actor.parameters(), torch.optim.Adam(actor.parameters(), lr=0.1), anneal=True
    )
    c_opt = learner.add(
        "critic", critic.parameters(), torch.optim.SGD(critic.parameters(), lr=0.5), max_grad_norm=0.01
    )
    t_actor = torch.optim.Adam(twins[0].parameters(), lr=0.1)
    t_critic = torch.optim.SGD(twins[1].parameters(), lr=0.5)
    x = torch.randn(16, 3)
    for k in range(3):
        assert learner.schedule(1.0 - k / 4) == pytest.approx(0.1 * (1 - k / 4))
        assert a_opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - k / 4))
        assert c_opt.param_groups[0]["lr"] == 0.5  # not annealed
        for group in t_actor.param_groups:
            group["lr"] = 0.1 * (1 - k / 4)
        norm = learner.step("actor", actor(x).pow(2).mean(), samples=16)
        assert norm is None  # no clipping asked for
        learner.step("critic", critic(x).sum(), samples=8)
        # The sequence every algorithm used to write, by hand:
        t_actor.zero_grad(set_to_none=True)
        twins[0](x).pow(2).mean().backward()
        t_actor.step()
        t_critic.zero_grad(set_to_none=True)
        twins[1](x).sum().backward()
        clip_grad_norm(twins[1].parameters(), 0.01)
        t_critic.step()
    for mine, twin in zip((actor, critic), twins):
        for p, q in zip(mine.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert strategy.calls == [("reduce", 16), ("apply", id(a_opt)), ("reduce", 8), ("apply", id(c_opt))] * 3
    assert list(learner.optimizers()) == ["actor", "critic"]


def test_a_non_finite_loss_never_reaches_the_weights():
    net = torch.nn.Linear(2, 1)
    before = [p.detach().clone() for p in net.parameters()]
    strategy = LocalStrategy()
    strategy.watch({"net": net}, "skip")
    learner = Learner(strategy)
    learner.add("optimizer", net.parameters(), torch.optim.SGD(net.parameters(), lr=1.0), max_grad_norm=1.0)
    learner.step("optimizer", net(torch.ones(1, 2)).sum() * float("nan"))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert strategy.nonfinite_skipped == 1

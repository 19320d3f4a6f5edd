"""The math of the algorithms, checked against hand-computed values and torch references."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces

from shoal.algos import DQN, PPO, SAC, DQNConfig, PPOConfig, SACConfig
from shoal.algos.dqn import td_target
from shoal.buffers import ReplayBuffer, gae
from shoal.distributed.strategy import LocalStrategy
from shoal.nn import ActorCritic, NatureCNN, QNetwork, gaussian_log_prob


def test_gae_matches_a_hand_computed_rollout():
    # One env, 4 steps: step 1 terminates, step 2 is the autoreset step, step 3 is truncated.
    gamma, lam = 0.9, 0.5
    rewards = torch.tensor([[1.0], [2.0], [0.0], [3.0]])
    values = torch.tensor([[0.5], [1.0], [4.0], [2.0]])
    terminated = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    done = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    next_value = torch.tensor([7.0])  # value of the final obs of the truncated episode
    adv = gae(rewards, values, next_value, terminated, done, gamma, lam).squeeze(1)
    d3 = 3.0 + gamma * 7.0 - 2.0  # truncation bootstraps from the final observation
    d2 = 0.0 + gamma * 2.0 - 4.0
    a2 = d2 + gamma * lam * d3
    d1 = 2.0 - 1.0  # termination: no bootstrap, and nothing flows back from step 2
    d0 = 1.0 + gamma * 1.0 - 0.5
    a0 = d0 + gamma * lam * d1
    torch.testing.assert_close(adv, torch.tensor([a0, d1, a2, d3]))


def test_gaussian_log_prob_matches_torch_normal():
    mean, log_std = torch.randn(5, 3), torch.randn(3) * 0.3
    x = torch.randn(5, 3)
    ref = torch.distributions.Normal(mean, log_std.exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, log_std), ref)


def test_categorical_evaluate_matches_torch():
    net = ActorCritic(spaces.Box(-1, 1, (4,)), spaces.Discrete(3))
    obs = torch.randn(6, 4)
    actions = torch.tensor([0, 1, 2, 0, 1, 2])
    logp, entropy, _ = net.evaluate(obs, actions)
    dist = torch.distributions.Categorical(logits=net.policy(obs))
    torch.testing.assert_close(logp, dist.log_prob(actions))
    torch.testing.assert_close(entropy, dist.entropy())


def test_continuous_actions_are_clipped_for_the_env_only():
    space = spaces.Box(-0.5, 0.5, (2,), np.float32)
    cfg = PPOConfig(env="Pendulum-v1", num_envs=3, num_steps=4, log_std_init=2.0)
    algo = PPO(cfg, spaces.Box(-1, 1, (3,), np.float32), space, torch.device("cpu"))
    env_actions = algo.act(np.zeros((3, 3), dtype=np.float32))
    raw = algo._last[1]
    assert env_actions.shape == (3, 2) and env_actions.dtype == np.float32
    assert np.all(env_actions <= 0.5) and np.all(env_actions >= -0.5)
    assert (raw.abs() > 0.5).any()  # the stored action (for the log-prob) is not clipped


def test_cnn_scales_uint8_frames_inside_the_network():
    for shape in [(84, 84, 4), (4, 84, 84)]:
        space = spaces.Box(0, 255, shape, np.uint8)
        net = NatureCNN(space)
        frames = torch.from_numpy(np.stack([space.sample() for _ in range(2)]))
        assert net(frames).shape == (2, 512)
        # the convolutions see channels-last activations on CPU (oneDNN's faster layout)
        prepared = net._prepare(frames)
        assert prepared.shape == (2, 4, 84, 84) and prepared.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(prepared, (frames.permute(0, 3, 1, 2) if shape[0] == 84 else frames) / 255.0)
        ac = ActorCritic(space, spaces.Discrete(6))
        logp, ent, value = ac.evaluate(frames, torch.tensor([1, 5]))
        assert logp.shape == ent.shape == value.shape == (2,)


def test_dqn_refuses_continuous_actions():
    with pytest.raises(ValueError, match="Discrete action space"):
        DQN(DQNConfig(), spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (1,)), torch.device("cpu"))


def test_n_step_returns_stop_at_episode_ends():
    buf = ReplayBuffer(100, 1, (1,), np.float32, (), np.int64, n_step=3, gamma=0.5)
    o = lambda v: np.array([[float(v)]], dtype=np.float32)  # noqa: E731
    f, t = np.array([False]), np.array([True])
    buf.add(o(0), np.array([0]), np.array([1.0]), o(1), f, f, t)
    buf.add(o(1), np.array([1]), np.array([2.0]), o(2), f, f, t)
    assert buf.size == 0  # waits for 3 rewards
    buf.add(o(2), np.array([0]), np.array([4.0]), o(3), f, f, t)
    assert buf.size == 1
    assert buf.returns[0] == 1 + 0.5 * 2 + 0.25 * 4 and buf.discounts[0] == 0.125 and buf.next_obs[0, 0] == 3
    buf.add(o(3), np.array([1]), np.array([8.0]), o(4), t, f, t)  # terminates: flush all, no bootstrap
    assert buf.size == 4
    np.testing.assert_allclose(buf.returns[1:4], [2 + 0.5 * 4 + 0.25 * 8, 4 + 0.5 * 8, 8])
    np.testing.assert_array_equal(buf.discounts[1:4], [0, 0, 0])
    buf.add(o(5), np.array([1]), np.array([9.0]), o(6), f, f, np.array([False]))  # autoreset step: skipped
    assert buf.size == 4


def test_double_dqn_target_uses_online_argmax_and_target_values():
    net = lambda: QNetwork(spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(2), (4,))  # noqa: E731
    online, target = net(), net()
    with torch.no_grad():
        for p in [*online.parameters(), *target.parameters()]:
            p.zero_()
        online.head.bias.copy_(torch.tensor([1.0, 0.0]))  # online prefers action 0
        target.head.bias.copy_(torch.tensor([10.0, 100.0]))  # target would prefer action 1
    obs = torch.zeros((2, 2))
    returns, discounts = torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.0])
    double = td_target(online, target, returns, obs, discounts, double_q=True)
    torch.testing.assert_close(double, torch.tensor([1.0 + 0.5 * 10.0, 1.0]))  # not 1 + 0.5 * 100
    vanilla = td_target(online, target, returns, obs, discounts, double_q=False)
    torch.testing.assert_close(vanilla, torch.tensor([1.0 + 0.5 * 100.0, 1.0]))


def test_clip_grad_norm_matches_torch_bitwise():
    from torch import nn

    from shoal.nn import clip_grad_norm

    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    for params in (ours, ref):
        sum((p**3).sum() for p in params).backward()
    assert torch.equal(clip_grad_norm(ours, 0.5), nn.utils.clip_grad_norm_(ref, 0.5))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, ref))
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours])) <= 0.5 + 1e-6


def test_twin_mlp_is_two_independent_mlps():
    from shoal.nn import TwinMLP

    twin = TwinMLP(4, (8, 8), torch.nn.Tanh)
    x = torch.randn(5, 4)
    actor, critic = twin(x)
    for k, out in enumerate((actor, critic)):
        h = x
        for w, b in zip(twin.weights, twin.biases):
            h = torch.tanh(h @ w[k] + b[k])
        torch.testing.assert_close(out, h)
    critic.sum().backward()  # the critic's loss must not reach the actor's weights
    assert all(w.grad[0].abs().sum() == 0 and w.grad[1].abs().sum() > 0 for w in twin.weights)


class _Pair(LocalStrategy):
    """A worker of a group of two that exchanges nothing: the group counts its steps twice."""

    world_size = 2

    def __init__(self, one_learner: bool) -> None:
        super().__init__()
        self.one_learner = one_learner


def _replay_schedule(algo_name: str, strategy: LocalStrategy, own_steps: int) -> dict[str, Any]:
    """Gradient steps, their batch sizes and target updates of one worker over ``own_steps``
    of its vector steps, fed the group's count as the trainer does (own steps x workers)."""
    obs_space, n = spaces.Box(-1, 1, (2,), np.float32), strategy.world_size
    common = dict(learning_starts=0, train_freq=8, gradient_steps=3, num_envs=2, buffer_size=1001)
    if algo_name == "dqn":
        config = DQNConfig(**common, batch_size=16, target_update_interval=16)
        algo = DQN(config, obs_space, spaces.Discrete(2), torch.device("cpu"), strategy)
    else:
        config = SACConfig(**common, batch_size=16, hidden=(8,))
        algo = SAC(config, obs_space, spaces.Box(-1, 1, (1,), np.float32), torch.device("cpu"), strategy)
    batches: list[int] = []
    sample = algo.replay.sample
    algo.replay.sample = lambda size, rng: batches.append(size) or sample(size, rng)
    targets = 0
    obs, no, yes = np.zeros((2, 2), np.float32), np.zeros(2, bool), np.ones(2, bool)
    for step in range(1, own_steps + 1):
        last_target = getattr(algo, "last_target", 0)
        algo.act(obs)
        algo.record(np.ones(2), no, no, obs, yes, step * 2 * n)
        if algo.ready():
            algo.update(obs, step * 2 * n)
        targets += getattr(algo, "last_target", 0) != last_target
    return {
        "gradient_steps": len(batches),
        "batch": set(batches),
        "target_updates": targets,
        "capacity": algo.replay.capacity,
    }


@pytest.mark.parametrize("algo_name", ["dqn", "sac"])
def test_replay_workers_averaged_into_one_learner_share_its_schedule_and_batch(algo_name):
    """Two workers whose updates are averaged (sync, param-avg) are one learner: over the same
    group steps they take its gradient steps and target updates, each on half its batch, so
    their mean update is its update, and each keeps half its replay buffer, so that together
    they hold its most recent transitions. Two whose updates are each applied (a3c) each learn
    like a learner alone on their own steps. (A pair once trained on the group's count with the
    whole batch each, twice the replay of one learner, and param-avg DQN collapsed; a pair
    that keeps two whole buffers replays twice as old data as the learner once they fill.)"""
    alone = _replay_schedule(algo_name, LocalStrategy(), 64)
    assert alone["gradient_steps"] == 64 * 2 // 8 * 3 and alone["batch"] == {16}
    assert alone["capacity"] == 1001
    averaged = _replay_schedule(algo_name, _Pair(one_learner=True), 32)  # the same 128 group steps
    assert averaged == {**alone, "batch": {8}, "capacity": 501}
    applied = _replay_schedule(algo_name, _Pair(one_learner=False), 64)  # 64 of its own steps
    assert applied == alone


@pytest.mark.parametrize("algo", ["ppo", "a2c", "impala", "appo"])
def test_activation_and_ortho_init_settings_shape_every_actor_critic(algo):
    """RL-Zoo's MuJoCo entries set ReLU and ortho_init False: both reach the network."""
    from shoal.agent import make_config
    from shoal.algos import ALGORITHMS

    obs_space, action_space = spaces.Box(-1, 1, (5,)), spaces.Box(-1, 1, (2,))
    make = ALGORITHMS[algo]
    for settings, relu, ortho in [
        ({}, False, True),
        ({"activation": "relu", "ortho_init": False}, True, False),
    ]:
        config = make_config(algo, "Pendulum-v1", settings)
        net = (
            make.actor_network(config, obs_space, action_space)
            if hasattr(make, "actor_network")
            else make(config, obs_space, action_space, torch.device("cpu")).net
        )
        assert isinstance(net.twin.activation, torch.nn.ReLU if relu else torch.nn.Tanh)
        w = net.twin.weights[0].detach()  # (2 bodies, 5 inputs, width)
        gram = w[0] @ w[0].T
        assert torch.allclose(gram, 2 * torch.eye(5), atol=1e-5) == ortho  # orthogonal, gain sqrt(2)
        head_std = float(net.actor_head.weight.detach().std())
        assert (head_std < 0.01) == ortho  # PPO's 0.01-gain policy head, or nn.Linear's default
        if not ortho:
            assert w.abs().max() <= 1 / 5**0.5 and net.twin.biases[0].abs().sum() > 0


@pytest.mark.parametrize(
    "strategy, share",
    [("sync", 501), ("param-avg", 501), ("param-server/sync", 501), ("param-server", 1001), ("a3c", 1001)],
)
def test_each_worker_allocates_the_replay_the_memory_check_counts(strategy, share):
    """The start-up memory check (from the flags) and the worker (from its strategy) agree on
    each worker's replay: half of buffer_size in a pair that is one learner, a whole one else."""
    from shoal.agent import make_config
    from shoal.config import replay_share
    from shoal.launch.ranks import make_strategy

    name, _, mode = strategy.partition("/")
    settings = dict(strategy=name, num_workers=2, backend="mp", buffer_size=1001)
    config = make_config("dqn", "CartPole-v1", {**settings, **({"ps_mode": mode} if mode else {})})
    obs_space = spaces.Box(-1, 1, (4,), np.float32)
    algo = DQN(config, obs_space, spaces.Discrete(2), torch.device("cpu"), make_strategy(config, 0))
    assert algo.replay.capacity == replay_share(config) == share
    assert config.memory_needed(obs_space, spaces.Discrete(2))["buffer_size"] == share * (2 * 16 + 16)

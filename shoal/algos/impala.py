"""IMPALA (Espeholt et al. 2018): a V-trace actor-critic on trajectories from decoupled actors.

Read top to bottom: the config, then one update on a batch of trajectories. V-trace under
the learner's current policy pi gives the value targets v_s and the policy-gradient
advantages ``rho_s * (r_s + gamma * v_{s+1} - V(x_s))``, with ``rho_s`` the importance ratio
pi/mu truncated at ``pg_rho_bar`` (the actors' policy mu is some updates older). The loss
is the paper's (section 4.2): the policy gradient ``-log pi(a_s|x_s) * advantage``, a value
loss towards v_s and an entropy bonus, one gradient step per batch by default, as in the
paper (``update_epochs``/``num_minibatches`` allow more, as RLlib's IMPALA does). Autoreset
steps (``valid`` False) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.algos.base import Trajectories, TrajectoryAlgorithm, fused_ok
from shoal.config import DecoupledConfig, activation_opt, opt, ortho_init_opt, vf_coef_opt


@dataclass
class IMPALAConfig(DecoupledConfig):
    """IMPALA's hyperparameters (the actor/learner ones are :class:`DecoupledConfig`'s)."""

    learning_rate: float = opt(5e-4, "Adam learning rate", gt=0)
    anneal_lr: bool = opt(True, "decay the learning rate linearly to 0 over training")
    gamma: float = opt(0.99, "discount factor", gt=0, le=1)
    rho_bar: float = opt(1.0, "V-trace: clip of the importance ratios of the TD errors (rho-bar)", gt=0)
    c_bar: float = opt(1.0, "V-trace: clip of the trace-cutting ratios (c-bar)", gt=0)
    vtrace_lambda: float = opt(
        1.0, "V-trace: lambda of the trace, c_s = lambda * min(c_bar, pi/mu) (1: the paper's)", ge=0, le=1
    )
    pg_rho_bar: float | None = opt(
        None, "clip of the importance ratios of the policy-gradient advantages (None: rho_bar)", gt=0
    )
    update_epochs: int = opt(1, "passes over each batch (the paper: 1)", ge=1)
    num_minibatches: int = opt(1, "minibatches per epoch (the paper: 1)", ge=1)
    norm_adv: bool = opt(False, "normalise advantages within each minibatch (the paper: no)")
    ent_coef: float = opt(0.01, "entropy bonus coefficient", ge=0)
    vf_coef: float = vf_coef_opt()
    max_grad_norm: float = opt(40.0, "gradient norm clip", gt=0)
    hidden: tuple[int, ...] = opt(
        (64, 64), "hidden layer sizes of actor and critic", item_ge=1, items="hidden layer sizes", frozen=True
    )
    activation: str = activation_opt()
    ortho_init: bool = ortho_init_opt()
    log_std_init: float = opt(
        0.0, "initial log standard deviation (continuous actions)", ge=-20, le=20, note="the std is its exp"
    )


class IMPALA(TrajectoryAlgorithm):
    name = "impala"
    config_class = IMPALAConfig

    def __init__(self, config: IMPALAConfig, obs_space, action_space, device, strategy=None) -> None:
        super().__init__(config, obs_space, action_space, device, strategy)
        adam = torch.optim.Adam(
            self.net.parameters(), lr=config.learning_rate, eps=1e-5, fused=fused_ok(device)
        )
        self.learner.add(
            "optimizer",
            self.net.parameters(),
            adam,
            max_grad_norm=config.max_grad_norm,
            anneal=config.anneal_lr,
        )

    def learn(self, batch: Trajectories, env_steps: int) -> dict[str, float]:
        c, net = self.config, self.net
        lr = self.learner.schedule(1.0 - env_steps / c.total_steps)
        stats = torch.zeros(4)  # pg loss, v loss, entropy, importance ratio
        count = 0
        for _ in range(c.update_epochs):
            # V-trace from the current weights each epoch: after a step, pi has moved.
            old_values, vs, advantages = self.vtrace_targets(
                batch, c.rho_bar, c.c_bar, c.pg_rho_bar, c.vtrace_lambda
            )
            keep = batch.valid.flatten()
            t = batch.rewards.shape[0]
            obs = self._obs(batch.obs[:t].flatten(0, 1)[keep])
            actions = batch.actions.flatten(0, 1)[keep]
            mu_logprobs = batch.behaviour_logprobs.flatten()[keep]
            advantages, vs = advantages.flatten()[keep], vs.flatten()[keep]
            n = len(obs)
            size = max(1, -(-n // c.num_minibatches))
            for idx in torch.randperm(n, device=self.device).split(size):
                logprob, entropy, value = net.evaluate(obs[idx], actions[idx])
                adv = advantages[idx]
                if c.norm_adv and len(adv) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = -(logprob * adv).mean()
                v_loss = 0.5 * ((value - vs[idx]) ** 2).mean()
                ent = entropy.mean()
                loss = pg_loss - c.ent_coef * ent + c.vf_coef * v_loss

                self.learner.step("optimizer", loss, samples=len(adv))

                with torch.no_grad():
                    ratio = (logprob - mu_logprobs[idx]).exp().mean()
                    stats += torch.stack([pg_loss, v_loss, ent, ratio]).cpu()
                count += 1
        self.updates += 1
        pg, vl, ent, ratio = (stats / max(count, 1)).tolist()
        var = vs.var()
        explained = (
            float(1 - (vs - old_values.flatten()[keep]).var() / var) if n > 1 and var > 0 else float("nan")
        )
        return {
            "policy_loss": pg,
            "value_loss": vl,
            "entropy": ent,
            "importance_ratio": ratio,
            "explained_variance": explained,
            "learning_rate": lr,
        }


# Tuned per env (chosen before the learning checks ran; see docs/distributed.md).
PRESETS: dict[str, dict] = {
    # 2 passes of 4 gradient steps over each batch of 1,024 env steps (its quarters), raw
    # advantages, gamma 0.98, a small entropy bonus, 300k steps; the best policy is kept on
    # 20 periodic episodes every 25k (the final one is not always the best). Session 13 chose
    # all but the 2 passes on seeds 1-8 (7, the CI check's seed, among them); with 1 pass the
    # runs sat at 400-460 between brief peaks at 500, and the kept policy missed 475 in 1 CI
    # run of 3 and 1 of 6 runs of session 14. With 2 passes (session 14), it scored >= 475 in
    # 29 runs of 29, seed 7 14 times (docs/distributed.md). Normalising the advantages (the
    # earlier preset) rescales them to unit std even when a policy at 500 leaves only noise
    # in them: runs fell from 500 to ~170 late in training; raw advantages shrink as the
    # critic catches up.
    "CartPole-v1": dict(
        num_envs=8,
        rollout_length=32,
        batch_trajectories=4,
        num_minibatches=4,
        update_epochs=2,
        norm_adv=False,
        learning_rate=5e-4,
        gamma=0.98,
        ent_coef=0.001,
        max_grad_norm=0.5,
        total_steps=300_000,
        eval_every=25_000,
        periodic_eval_episodes=20,
    ),
}
IMPALA.presets = PRESETS

"""V-trace (shoal.algos.vtrace) against a naive reference, on-policy GAE and hand-computed rollouts."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.algos.vtrace import vtrace
from shoal.buffers import gae

T, N = 20, 5


def naive_vtrace(log_mu, log_pi, r, v, boot, term, done, gamma, rho_bar, c_bar, pg_rho_bar, lam=1.0):
    """The paper's sum form, one (step, env) at a time, the sum cut at the episode's end.

    v_s = V(x_s) + sum_{t=s}^{e} gamma^(t-s) (prod_{i=s}^{t-1} lam c_i) delta_t, where ``e`` is the
    first ``done`` step at or after ``s`` (or the last step of the rollout), and
    delta_t = rho_t (r_t + gamma V(x_{t+1}) - V(x_t)) with V(x_{t+1}) the value of the
    observation step t returned: 0 after a termination, ``v[t + 1]`` (``boot`` after the last
    step) otherwise.
    """
    log_mu, log_pi, r, v, term, done = (x.tolist() for x in (log_mu, log_pi, r, v, term, done))
    boot = boot.tolist()
    steps, envs = len(r), len(r[0])

    def ratio(t, n):
        return math.exp(log_pi[t][n] - log_mu[t][n])

    def value_after(t, n):
        if term[t][n]:
            return 0.0
        return v[t + 1][n] if t + 1 < steps else boot[n]

    vs = [[0.0] * envs for _ in range(steps)]
    pg = [[0.0] * envs for _ in range(steps)]
    for n in range(envs):
        for s in range(steps):
            end = s
            while end < steps - 1 and not done[end][n]:
                end += 1
            total = v[s][n]
            for t in range(s, end + 1):
                trace = 1.0
                for i in range(s, t):
                    trace *= lam * min(c_bar, ratio(i, n))
                delta = min(rho_bar, ratio(t, n)) * (r[t][n] + gamma * value_after(t, n) - v[t][n])
                total += gamma ** (t - s) * trace * delta
            vs[s][n] = total
        for s in range(steps):
            # v_{s+1}: the next target inside the episode, the value after s at its end.
            ends_here = done[s][n] or s == steps - 1
            next_v = value_after(s, n) if ends_here else vs[s + 1][n]
            pg[s][n] = min(pg_rho_bar, ratio(s, n)) * (r[s][n] + gamma * next_v - v[s][n])
    return torch.tensor(vs, dtype=torch.float64), torch.tensor(pg, dtype=torch.float64)


def rollout(seed: int, p_term: float = 0.1, p_trunc: float = 0.1, log_ratio_scale: float = 1.0):
    """Random float64 (T, N) inputs with random terminations and truncations."""
    g = torch.Generator().manual_seed(seed)
    log_mu = -torch.rand(T, N, generator=g, dtype=torch.float64) * 3
    log_pi = log_mu + torch.randn(T, N, generator=g, dtype=torch.float64) * log_ratio_scale
    rewards = torch.randn(T, N, generator=g, dtype=torch.float64)
    values = torch.randn(T, N, generator=g, dtype=torch.float64)
    boot = torch.randn(N, generator=g, dtype=torch.float64)
    term = torch.rand(T, N, generator=g, dtype=torch.float64) < p_term
    trunc = (torch.rand(T, N, generator=g, dtype=torch.float64) < p_trunc) & ~term
    return dict(
        behaviour_logprobs=log_mu,
        target_logprobs=log_pi,
        rewards=rewards,
        values=values,
        bootstrap_value=boot,
        terminated=term.double(),
        done=(term | trunc).double(),
    )


def gae1(x: dict, gamma: float) -> torch.Tensor:
    return gae(x["rewards"], x["values"], x["bootstrap_value"], x["terminated"], x["done"], gamma, lam=1.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    ("rho_bar", "c_bar", "pg_rho_bar", "lam"),
    [
        (1.0, 1.0, None, 1.0),
        (1.5, 0.8, 0.6, 1.0),
        (0.7, 1.2, 2.0, 1.0),
        (1.0, 1.0, None, 0.9),
        (1.5, 0.8, 0.6, 0.5),
    ],
)
def test_matches_the_naive_sum_form(seed, rho_bar, c_bar, pg_rho_bar, lam):
    x = rollout(seed)
    done, term = x["done"].bool(), x["terminated"].bool()
    ratio = (x["target_logprobs"] - x["behaviour_logprobs"]).exp()
    # the inputs exercise what they should: both clips bind and don't, both kinds of ends
    for bar in (rho_bar, c_bar, pg_rho_bar or rho_bar):
        assert (ratio > bar).sum() >= 5 and (ratio < bar).sum() >= 5
    assert term.sum() >= 3 and (done & ~term).sum() >= 3
    gamma = 0.95
    vs, pg_adv = vtrace(**x, gamma=gamma, rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar, lam=lam)
    ref_vs, ref_pg = naive_vtrace(
        *(x[k] for k in ("behaviour_logprobs", "target_logprobs", "rewards", "values")),
        x["bootstrap_value"],
        x["terminated"],
        x["done"],
        gamma,
        rho_bar,
        c_bar,
        rho_bar if pg_rho_bar is None else pg_rho_bar,
        lam,
    )
    assert vs.dtype == pg_adv.dtype == torch.float64 and vs.shape == pg_adv.shape == (T, N)
    torch.testing.assert_close(vs, ref_vs, rtol=0, atol=1e-6)
    torch.testing.assert_close(pg_adv, ref_pg, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("rho_bar", "c_bar"), [(1.0, 1.0), (2.0, 1.5)])
def test_on_policy_is_gae_lambda_one(seed, rho_bar, c_bar):
    x = rollout(seed)
    x["target_logprobs"] = x["behaviour_logprobs"].clone()  # pi = mu: every ratio is 1
    gamma = 0.9
    vs, pg_adv = vtrace(**x, gamma=gamma, rho_bar=rho_bar, c_bar=c_bar)
    adv = gae1(x, gamma)
    torch.testing.assert_close(vs, adv + x["values"], rtol=0, atol=1e-10)
    # pg_adv = r_t + gamma * v_{t+1} - V(x_t), where v_{t+1} is the next target inside an
    # episode, the stored next value after a truncation, 0 after a termination and the
    # bootstrap after the last step: on-policy, that is the GAE(1) advantage itself.
    r, v, term, done = x["rewards"], x["values"], x["terminated"], x["done"]
    after = torch.cat([v[1:], x["bootstrap_value"][None]])
    next_vs = torch.where(done.bool(), after, torch.cat([vs[1:], x["bootstrap_value"][None]]))
    torch.testing.assert_close(pg_adv, r + gamma * (1 - term) * next_vs - v, rtol=0, atol=1e-10)
    torch.testing.assert_close(pg_adv, adv, rtol=0, atol=1e-10)


@pytest.mark.parametrize("lam", [0.95, 0.5, 0.0])
def test_on_policy_with_lambda_is_gae_lambda(lam):
    x = rollout(2)
    x["target_logprobs"] = x["behaviour_logprobs"].clone()
    gamma = 0.9
    vs, _ = vtrace(**x, gamma=gamma, lam=lam)
    adv = gae(x["rewards"], x["values"], x["bootstrap_value"], x["terminated"], x["done"], gamma, lam=lam)
    torch.testing.assert_close(vs, adv + x["values"], rtol=0, atol=1e-10)
    assert lam == 1.0 or not torch.allclose(adv, gae1(x, gamma))  # lambda changed something


def test_large_ratios_are_clipped():
    # ratios e^3 ~ 20 everywhere: clipped to 1, the targets are the on-policy ones
    x = rollout(0)
    x["target_logprobs"] = x["behaviour_logprobs"] + 3.0
    gamma = 0.9
    adv = gae1(x, gamma)
    vs, pg_adv = vtrace(**x, gamma=gamma, rho_bar=1.0, c_bar=1.0)
    torch.testing.assert_close(vs, adv + x["values"], rtol=0, atol=1e-10)
    torch.testing.assert_close(pg_adv, adv, rtol=0, atol=1e-10)  # pg clip defaults to rho_bar
    # the policy-gradient clip is its own: at 2, the advantages double and the targets stay
    vs2, pg_adv2 = vtrace(**x, gamma=gamma, rho_bar=1.0, c_bar=1.0, pg_rho_bar=2.0)
    torch.testing.assert_close(vs2, vs, rtol=0, atol=1e-10)
    torch.testing.assert_close(pg_adv2, 2 * adv, rtol=0, atol=1e-10)


def test_trace_clip_only_shortens_the_trace():
    # c_bar = 0 cuts every trace after one step: v_s = V(x_s) + rho_s * TD error, with rho_s
    # the ratio itself where it is below rho_bar and rho_bar where above
    x = rollout(1)
    gamma = 0.9
    vs, _ = vtrace(**x, gamma=gamma, rho_bar=1.0, c_bar=0.0)
    r, v, term = x["rewards"], x["values"], x["terminated"]
    after = torch.cat([v[1:], x["bootstrap_value"][None]])
    ratio = (x["target_logprobs"] - x["behaviour_logprobs"]).exp()
    assert (ratio > 1).any() and (ratio < 1).any()
    expected = v + ratio.clamp(max=1.0) * (r + gamma * (1 - term) * after - v)
    torch.testing.assert_close(vs, expected, rtol=0, atol=1e-10)


def test_episode_ends_by_hand():
    # Two envs, 4 steps, the same ratios per step. Env 0 terminates at step 1 (step 2 is the
    # autoreset step, step 3 runs into the bootstrap); env 1 is truncated at steps 1 and 3.
    g = 0.9
    ratios = torch.tensor([0.5, 2.0, 1.0, 0.25])  # rho_bar 1.5, c_bar 1
    rho, c = ratios.clamp(max=1.5).tolist(), ratios.clamp(max=1.0).tolist()
    log_mu = torch.full((4, 2), -1.0)
    column = torch.tensor([[1.0], [2.0], [0.0], [3.0]])
    vcolumn = torch.tensor([[0.5], [1.0], [4.0], [2.0]])
    vs, pg = vtrace(
        behaviour_logprobs=log_mu,
        target_logprobs=log_mu + ratios.log()[:, None],
        rewards=column.repeat(1, 2),
        values=vcolumn.repeat(1, 2),
        bootstrap_value=torch.tensor([6.0, 7.0]),
        terminated=torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),
        done=torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]),
        gamma=g,
        rho_bar=1.5,
        c_bar=1.0,
    )
    # env 0
    vs3 = 2 + rho[3] * (3 + g * 6 - 2)
    vs2 = 4 + rho[2] * (0 + g * 2 - 4) + g * c[2] * (vs3 - 2)
    vs1 = 1 + rho[1] * (2 - 1)  # termination: no bootstrap, nothing from steps 2-3
    vs0 = 0.5 + rho[0] * (1 + g * 1 - 0.5) + g * c[0] * (vs1 - 1)
    pg_env0 = [
        rho[0] * (1 + g * vs1 - 0.5),
        rho[1] * (2 - 1),
        rho[2] * (0 + g * vs3 - 4),
        rho[3] * (3 + g * 6 - 2),
    ]
    torch.testing.assert_close(vs[:, 0], torch.tensor([vs0, vs1, vs2, vs3]))
    torch.testing.assert_close(pg[:, 0], torch.tensor(pg_env0))
    # env 1
    vs3 = 2 + rho[3] * (3 + g * 7 - 2)  # truncated into the bootstrap value
    vs2 = 4 + rho[2] * (0 + g * 2 - 4) + g * c[2] * (vs3 - 2)
    vs1 = 1 + rho[1] * (2 + g * 4 - 1)  # truncation: bootstraps from the stored next value
    vs0 = 0.5 + rho[0] * (1 + g * 1 - 0.5) + g * c[0] * (vs1 - 1)
    pg_env1 = [
        rho[0] * (1 + g * vs1 - 0.5),
        rho[1] * (2 + g * 4 - 1),  # the stored next value, not the autoreset step's target
        rho[2] * (0 + g * vs3 - 4),
        rho[3] * (3 + g * 7 - 2),
    ]
    torch.testing.assert_close(vs[:, 1], torch.tensor([vs0, vs1, vs2, vs3]))
    torch.testing.assert_close(pg[:, 1], torch.tensor(pg_env1))


@pytest.mark.parametrize("kind", ["terminated", "truncated"])
def test_nothing_crosses_an_episode_end(kind):
    # Env 0 ends at step 7: whatever happens after it cannot move the targets up to it,
    # except, after a truncation, the stored value of the observation step 7 returned.
    x = rollout(2, p_term=0.0, p_trunc=0.0)
    k = 7
    x["done"][k, 0] = 1.0
    x["terminated"][k, 0] = 1.0 if kind == "terminated" else 0.0
    gamma, clips = 0.9, dict(rho_bar=1.2, c_bar=1.5, pg_rho_bar=0.9)
    vs, pg = vtrace(**x, gamma=gamma, **clips)

    y = {name: t.clone() for name, t in x.items()}
    g = torch.Generator().manual_seed(99)
    for name in ("behaviour_logprobs", "target_logprobs", "rewards"):
        y[name][k + 1 :, 0] = torch.randn(T - k - 1, generator=g, dtype=torch.float64)
    y["values"][k + 2 :, 0] = torch.randn(T - k - 2, generator=g, dtype=torch.float64)
    y["terminated"][k + 1 :, 0] = 0.0
    y["done"][k + 1 :, 0] = 0.0
    y["bootstrap_value"][0] += 5.0
    vs_y, pg_y = vtrace(**y, gamma=gamma, **clips)
    assert not torch.allclose(vs_y[k + 1 :, 0], vs[k + 1 :, 0])  # the perturbation was felt
    torch.testing.assert_close(vs_y[: k + 1], vs[: k + 1], rtol=0, atol=0)
    torch.testing.assert_close(pg_y[: k + 1], pg[: k + 1], rtol=0, atol=0)

    # the value of the observation step k returned (stored at k + 1)
    z = {name: t.clone() for name, t in x.items()}
    z["values"][k + 1, 0] += 1.0
    vs_z, pg_z = vtrace(**z, gamma=gamma, **clips)
    ratio = math.exp(x["target_logprobs"][k, 0] - x["behaviour_logprobs"][k, 0])
    bootstrapped = 1.0 if kind == "truncated" else 0.0
    assert vs_z[k, 0] - vs[k, 0] == pytest.approx(bootstrapped * gamma * min(clips["rho_bar"], ratio))
    assert pg_z[k, 0] - pg[k, 0] == pytest.approx(bootstrapped * gamma * min(clips["pg_rho_bar"], ratio))


def test_targets_carry_no_gradient_and_keep_the_dtype():
    x = {name: t.float() for name, t in rollout(3).items()}
    x["values"].requires_grad_(True)
    x["target_logprobs"].requires_grad_(True)
    vs, pg = vtrace(**x, gamma=0.99)
    assert not vs.requires_grad and not pg.requires_grad
    assert vs.dtype == pg.dtype == torch.float32
    x64 = {name: t.detach().double() for name, t in x.items()}
    vs64, pg64 = vtrace(**x64, gamma=0.99)
    torch.testing.assert_close(vs, vs64.float(), rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_are_refused():
    x = rollout(0)
    x["values"] = x["values"][:-1]
    with pytest.raises(ValueError, match="values"):
        vtrace(**x, gamma=0.99)

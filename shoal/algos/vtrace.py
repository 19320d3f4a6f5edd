"""V-trace (Espeholt et al. 2018, "IMPALA", section 4.1): off-policy value targets.

In IMPALA-style training, actors keep acting with a copy of the policy that is a few updates
old (the behaviour policy mu) while the learner updates the current one (the target policy
pi). Plain n-step returns of mu's trajectories would then estimate mu's values, not pi's.
V-trace reweights each TD error by a truncated importance ratio, so the targets estimate
the value of pi (of a policy between mu and pi when the clips bind), and the variance stays
bounded however stale the actor's policy is.

With ``rho_t = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t))`` and ``c_t = lam * min(c_bar, pi/mu)``::

    delta_t = rho_t * (r_t + gamma * V(x_{t+1}) - V(x_t))
    v_s     = V(x_s) + sum_{t=s}^{s+n-1} gamma^(t-s) * (prod_{i=s}^{t-1} c_i) * delta_t
            = V(x_s) + delta_s + gamma * c_s * (v_{s+1} - V(x_{s+1}))        (computed so)
    pg_adv_s = min(pg_rho_bar, pi/mu) * (r_s + gamma * v_{s+1} - V(x_s))

``rho_bar`` sets which policy's value the targets converge to; ``c_bar`` only how far the
trace reaches (how fast they converge). ``lam`` (the paper's remark after eq. 1, as in
Retrace(lambda); 1 by default) shortens the trace further: on-policy, ``v_s - V(x_s)`` is
then GAE(lambda)'s advantage, with its lower variance. Episode ends follow :func:`shoal.buffers.gae`:
``values[t + 1]`` (``bootstrap_value`` at the end) is the value of the observation step
``t`` returned, replaced by zero after a termination and kept after a truncation; the sum
stops at every ``done`` (terminated or truncated), so nothing crosses an episode end. In
``pg_adv``, ``v_{s+1}`` after a truncation is that stored next value (the episode has no
later steps to correct it), and zero after a termination. The autoreset steps that follow
an episode end get numbers too, which, as with ``gae``, are not to be trained on.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class VTraceReturns(NamedTuple):
    vs: torch.Tensor  # (T, N) value targets v_s
    pg_advantages: torch.Tensor  # (T, N) policy-gradient advantages


def vtrace(
    behaviour_logprobs: torch.Tensor,
    target_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    terminated: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    pg_rho_bar: float | None = None,
    lam: float = 1.0,
) -> VTraceReturns:
    """V-trace targets and policy-gradient advantages over a time-major (T, N) rollout.

    ``behaviour_logprobs`` are log mu(a_t|x_t) as the actor recorded them,
    ``target_logprobs`` log pi(a_t|x_t) under the policy being trained, ``values`` V(x_t)
    and ``bootstrap_value`` (N,) the value of the observation after the last step.
    ``pg_rho_bar`` clips the ratios of ``pg_advantages`` (default ``rho_bar``). The results
    carry no gradient, in the dtype and on the device of ``rewards``.
    """
    shape = rewards.shape
    if len(shape) != 2:
        raise ValueError(f"vtrace: rewards must be (T, N), got {tuple(shape)}")
    named = dict(
        behaviour_logprobs=behaviour_logprobs,
        target_logprobs=target_logprobs,
        values=values,
        terminated=terminated,
        done=done,
    )
    for name, x in named.items():
        if x.shape != shape:
            raise ValueError(f"vtrace: {name} has shape {tuple(x.shape)}, rewards {tuple(shape)}")
    if bootstrap_value.shape != shape[1:]:
        raise ValueError(f"vtrace: bootstrap_value must be ({shape[1]},), got {tuple(bootstrap_value.shape)}")
    pg_rho_bar = rho_bar if pg_rho_bar is None else pg_rho_bar

    # A sequential loop over (T, N) numpy arrays, as in gae: numpy's per-op cost is lower.
    dtype = rewards.detach().cpu().numpy().dtype

    def array(x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().numpy().astype(dtype, copy=False)

    log_mu, log_pi, r, v, term, d = map(
        array, (behaviour_logprobs, target_logprobs, rewards, values, terminated, done)
    )
    last = array(bootstrap_value)
    with np.errstate(over="ignore"):  # a huge ratio is clipped anyway
        ratio = np.exp(log_pi - log_mu)
    rho = np.minimum(rho_bar, ratio)
    c = lam * np.minimum(c_bar, ratio)
    pg_rho = np.minimum(pg_rho_bar, ratio)

    following = np.concatenate([v[1:], last[None]], axis=0)  # value of the obs step t returned
    not_term = 1.0 - term
    deltas = rho * (r + gamma * following * not_term - v)
    carry = gamma * c * (1.0 - d)
    vs_minus_v = np.zeros_like(r)
    acc = np.zeros_like(r[0])
    for t in reversed(range(r.shape[0])):
        acc = deltas[t] + carry[t] * acc
        vs_minus_v[t] = acc
    vs = v + vs_minus_v

    # v_{s+1} for the advantage: the next target within an episode, the stored next value at
    # its end (times zero after a termination), the bootstrap value after the last step.
    next_vs = np.where(d > 0, following, np.concatenate([vs[1:], last[None]], axis=0))
    pg_adv = pg_rho * (r + gamma * next_vs * not_term - v)

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)).to(rewards.device)

    return VTraceReturns(tensor(vs), tensor(pg_adv))

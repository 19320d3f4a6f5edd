"""Numerical guards: a NaN or inf never reaches the weights.

Two places are checked, both on the fast path with one ``isfinite`` each:

- what the envs return (observations and rewards), in the training loop right after every
  vector step (:class:`EnvGuard`);
- the loss and the gradients, in ``Strategy.step`` just before the optimizer would apply
  them (:func:`gradients_ok`), after any all-reduce, so that every worker of a synchronous
  group decides the same way.

``nan_policy="raise"`` stops training with a :class:`NonFiniteError` that names the source
(no checkpoint is written after it; the ones on disk were saved from finite weights).
``nan_policy="skip"`` drops what is bad and counts it: env steps of a bad env are not
learned from until its episode ends, and an optimizer step with bad gradients is not taken.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


class NonFiniteError(RuntimeError):
    """A NaN or inf reached training; the message says where it came from."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.source = source
        self.env_steps: int | None = None  # filled in by the trainer, which knows them
        self.worker: int | None = None
        self.checkpoint: Path | None = None
        self.context = False  # whether the trainer filled in the fields above

    def __str__(self) -> str:
        text = self.source
        if self.worker is not None:
            text += f" on worker {self.worker}"
        if self.env_steps is not None:
            text += f" at env step {self.env_steps:,}"
        if not self.context:
            return text
        saved = f"last good checkpoint: {self.checkpoint}" if self.checkpoint else "no checkpoint written yet"
        return f"{text}; training stopped before the weights changed; {saved}"


def _kind(values: np.ndarray | torch.Tensor) -> str:
    """'nan' or 'inf' (or '-inf'): what the first non-finite entry is."""
    flat = values.reshape(-1)
    bad = flat[~(np.isfinite(flat) if isinstance(flat, np.ndarray) else torch.isfinite(flat))]
    return str(float(bad[0])) if len(bad) else "finite"


def _floating(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind in "fc"


def _bad_rows(x: Any, n: int) -> np.ndarray:
    """Per env, whether any of its entries in batch ``x`` is non-finite."""
    if not _floating(x):
        return np.zeros(n, dtype=bool)
    return ~np.isfinite(x.reshape(n, -1)).all(axis=1)


class EnvGuard:
    """Screens each vector step's observations and rewards.

    Under ``skip`` an env that returned a non-finite value is quarantined until its episode
    ends: its steps are stored as invalid (never trained on), its episode is not logged,
    and non-finite entries are replaced by 0 so the policy can still act on the batch.
    Cutting the episode at the fault is the honest choice: an env whose state went NaN
    usually stays NaN, and a partial return is no return.
    """

    def __init__(self, num_envs: int, policy: str) -> None:
        self.num_envs, self.policy = num_envs, policy
        self.tainted = np.zeros(num_envs, dtype=bool)
        self.active = False  # any env quarantined right now (the loop's only per-step test)
        self.skipped_steps = 0  # env steps not learned from, since this guard was made

    @staticmethod
    def finite(obs: Any, rewards: np.ndarray | None = None) -> bool:
        """The fast path: whether everything is finite (one ``isfinite`` per array)."""
        if _floating(obs) and not np.isfinite(obs).all():
            return False
        return rewards is None or bool(np.isfinite(rewards).all())

    def screen(self, obs: Any, rewards: np.ndarray | None, after: str = "") -> tuple[Any, Any, np.ndarray]:
        """Raise (``raise``), or return (obs, rewards, envs skipped this step) made finite (``skip``).

        Call only when :meth:`finite` is False or :attr:`active`; ``after`` ends the message.
        """
        bad_obs = _bad_rows(obs, self.num_envs)
        bad_rew = _bad_rows(rewards, self.num_envs) if rewards is not None else np.zeros_like(bad_obs)
        bad = bad_obs | bad_rew
        if bad.any() and self.policy == "raise":
            e = int(np.flatnonzero(bad)[0])
            if bad_obs[e]:
                raise NonFiniteError(f"observation of env {e} is {_kind(obs[e])}{after}")
            raise NonFiniteError(f"reward of env {e} is {_kind(rewards[e])}{after}")
        self.tainted |= bad
        skipped = self.tainted.copy()
        self.skipped_steps += int(skipped.sum()) if rewards is not None else 0
        if bad_obs.any():
            obs = np.where(np.isfinite(obs), obs, 0).astype(obs.dtype, copy=False)
        if rewards is not None and skipped.any():
            rewards = np.where(skipped, 0, rewards).astype(rewards.dtype, copy=False)
        self.active = bool(self.tainted.any())
        return obs, rewards, skipped

    def episodes_ended(self, ended: np.ndarray) -> None:
        """Envs whose episode ended leave quarantine (their next step is a fresh episode's)."""
        self.tainted &= ~ended
        self.active = bool(self.tainted.any())

    def after_reset(self, obs: Any) -> Any:
        """Every env was reset: quarantines end, and a non-finite first observation starts one."""
        self.tainted[:] = False
        self.active = False
        return obs if self.finite(obs) else self.screen(obs, None, " after reset")[0]


def _grads(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(p, p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def gradients_ok(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor | None,
    grad_norm: torch.Tensor | None,
    names: dict[int, str],
    policy: str,
    loss_decides: bool = True,
) -> bool:
    """Whether the optimizer may apply the gradients it holds; raise under ``raise`` if not.

    ``grad_norm`` is the total norm ``clip_grad_norm`` returned (computed here if None):
    it is non-finite exactly when some gradient is, so the check costs one ``isfinite``
    and one host sync. ``loss_decides=False`` ignores the loss in the decision (it is
    then only named): a synchronous group must decide on the reduced gradients, the same
    on every worker, and a worker's NaN loss already makes its gradient, hence the sum, NaN.
    """
    if grad_norm is None:
        grads = [g for _, g in _grads(optimizer)]
        if not grads:
            return True
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    probe = grad_norm + loss.detach() if loss is not None and loss_decides else grad_norm
    if torch.isfinite(probe):
        return True
    if loss is not None and not torch.isfinite(loss):
        source = f"loss is {_kind(loss.detach())}"
    else:
        source = f"gradient norm is {float(grad_norm)} though every gradient is finite"  # overflow
        for k, (p, g) in enumerate(_grads(optimizer)):
            if not torch.isfinite(g).all():
                name = names.get(id(p), f"parameter {k} of the optimizer")
                source = f"gradient of {name} is {_kind(g.detach())}"
                break
    if policy == "raise":
        raise NonFiniteError(source)
    return False

"""Training configuration: one typed dataclass per algorithm, every field a CLI flag.

``TrainConfig`` holds what every algorithm shares; ``shoal.algos.<name>`` subclasses it with
its hyperparameters. Each field declares, in its metadata, a one-line ``help``, its help
``group`` and its constraints (bounds, choices, which other setting it needs), so the
generic layer (``shoal.configio``, the CLI) never names an algorithm's field: a new
algorithm is a new file. Cross-field rules live in ``validate``, which a subclass extends
after calling ``super().validate()``, as RLlib's ``PPOConfig.validate()`` does.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import reprlib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.distributed.names import BACKENDS, STRATEGIES, one_learner


class ConfigError(ValueError):
    """Invalid configuration; its message is one line a user can act on."""


# Help groups, in the order ``--help`` lists them.
ALGORITHM, ENVS, DISTRIBUTION, RUN_FILES, FAULTS = "algorithm", "envs", "distribution", "run files", "faults"
GROUPS = (ALGORITHM, ENVS, DISTRIBUTION, RUN_FILES, FAULTS)

# Upper bounds that keep a typo from exhausting the machine.
MAX_INT = 10**15
MAX_NUM_ENVS = 10_000  # each env is a Python object stepped on this machine
MAX_ENV_WORKERS = 256
MAX_TORCH_THREADS = 256  # torch crashes on absurd thread counts
MAX_EVAL_EPISODES = 10_000  # an evaluation plays 20 episodes at a time: 1e9 never end


def opt(
    default: Any,
    help: str,
    *,
    group: str = ALGORITHM,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    only_with: tuple[Callable[[Any], bool], str] | None = None,
    item_ge: int | None = None,
    items: str = "",
    frozen: bool = False,
) -> Any:
    """A dataclass field with a default, a one-line help string and its constraints.

    ``ge``/``gt``/``le``/``lt`` bound a number (``note`` says why, in the error line);
    ``choices`` lists the allowed strings (a callable: looked up when validating, so that
    a heavy module is imported only then); ``only_with`` is ``(applies(config), where)``:
    the setting means something only where ``applies`` holds; ``item_ge`` bounds each
    entry of a tuple (``items`` names the entries in the error line); ``frozen``: the
    checkpoint's tensors are shaped by it, so ``--resume`` must keep it.
    """
    meta = dict(help=help, group=group, ge=ge, gt=gt, le=le, lt=lt, note=note, choices=choices)
    meta.update(only_with=only_with, item_ge=item_ge, items=items, frozen=frozen or None)
    return field(default=default, metadata={k: v for k, v in meta.items() if v not in (None, "")})


ACTIVATIONS = ("tanh", "relu")


def activation_opt() -> Any:
    """The ``activation`` setting of an actor-critic's MLP bodies (RL-Zoo sets ReLU on MuJoCo)."""
    return opt(
        "tanh", "activation of the actor's and critic's hidden layers", choices=ACTIVATIONS, frozen=True
    )


def vf_coef_opt() -> Any:
    """The value loss's weight. shoal's value loss is half the squared error (CleanRL's), SB3's
    the whole (its ``vf_coef`` c weighs as 2c does here): ``sb3_vf_coef`` converts."""
    return opt(0.5, "value loss coefficient (of 0.5 x the squared error; SB3's vf_coef c is 2c here)", ge=0)


def sb3_vf_coef(shoal: float) -> float:
    """SB3's ``vf_coef`` for shoal's: SB3 weighs the mean squared error, shoal half of it."""
    return shoal / 2


def vf_coef_from_sb3(sb3: float) -> float:
    """shoal's ``vf_coef`` for SB3's (RL-Zoo's): the inverse of :func:`sb3_vf_coef`."""
    return sb3 * 2


def ortho_init_opt() -> Any:
    """The ``ortho_init`` setting (SB3's name): RL-Zoo turns it off for some MuJoCo entries."""
    return opt(
        True,
        "orthogonal initialisation of the actor's and critic's layers (PPO's); off: PyTorch's default",
        frozen=True,
    )


def show(value: Any) -> str:
    """A value for an error message: its repr, cut short (a file can hold anything)."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 2


def names_list(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, optional) of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def is_int(value: Any) -> bool:
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and type(value).__name__ != "bool_"
    )


def kind(base: Any) -> str:
    """How a field's type reads in an error message."""
    if typing.get_origin(base) is tuple:
        return "a list of integers like [64, 64]"
    return {bool: "true or false", int: "an int", float: "a float", str: "a str"}.get(base, str(base))


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def _range_error(name: str, value: Any, meta: dict[str, Any], is_integer: bool) -> str | None:
    """The one line for a number outside its declared bounds, or None."""
    ge, gt, le, lt, note = (meta.get(k) for k in ("ge", "gt", "le", "lt", "note"))
    note = f" ({note})" if note else ""
    low_ok = (ge is None or value >= ge) and (gt is None or value > gt)
    high_ok = (le is None or value <= le) and (lt is None or value < lt)
    if low_ok and high_ok:
        return None
    if (le is not None or lt is not None) and (ge is not None or gt is not None) and not is_integer:
        left = f"[{ge:g}" if ge is not None else f"({gt:g}"
        right = f"{le:g}]" if le is not None else f"{lt:g})"
        return f"{name} must be in {left}, {right}{note}, got {value!r}"
    if not low_ok:
        if is_integer and ge == 1:
            return f"{name} must be a positive integer, got {value!r}"
        bound = f">= {ge:g}" if ge is not None else f"> {gt:g}"
        return f"{name} must be {bound}{note}, got {value!r}"
    if le is not None:
        return f"{name} must be at most {le:,}{note}, got {value:,}"
    return f"{name} must be below {lt}{note}, got {value!r}"


def _compress_modes() -> tuple[str, ...]:
    from shoal.distributed.compress import MODES  # imports torch: only when validating

    return MODES


@dataclass
class TrainConfig:
    """What every algorithm's run needs, whatever the algorithm."""

    env: str = opt("CartPole-v1", "gymnasium env id", group=ENVS, frozen=True)
    num_envs: int = opt(
        8, "parallel environments", group=ENVS, ge=1, le=MAX_NUM_ENVS, note="each env runs on this machine"
    )
    total_steps: int = opt(100_000, "env steps to train for (summed over envs)", ge=1)
    seed: int = opt(1, "run seed: envs, weights and sampling all derive from it", ge=0, lt=2**63)
    vectorization: str = opt(
        "auto", "env stepping: auto|sync|process", group=ENVS, choices=("auto", "sync", "process")
    )
    env_workers: int | None = opt(
        None,
        "vector-env processes for vectorization=process (default: cores)",
        group=ENVS,
        ge=1,
        only_with=(lambda c: c.vectorization != "sync", "--vectorization process (or auto)"),
    )
    atari_wrappers: bool = opt(
        True,
        "ALE/... and *NoFrameskip-v4 ids: the standard Atari preprocessing (30 no-ops, skip 4, 84x84"
        " gray, 4 stacked frames, life loss ends training episodes, FIRE on reset, sign of rewards;"
        " docs/atari.md); logged returns are whole-game scores",
        group=ENVS,
        frozen=True,
    )
    device: str = opt("auto", "learner device: auto|cpu|cuda|cuda:N")
    run_dir: str | None = opt(
        None, "where to write the run (default: runs/<env>-<algo>-<seed>-<time>)", group=RUN_FILES
    )
    eval_episodes: int = opt(
        20, "episodes of the final greedy evaluation", group=RUN_FILES, ge=1, le=MAX_EVAL_EPISODES
    )
    eval_every: int = opt(
        0,
        "env steps between greedy evaluations, which keep the best checkpoint in checkpoints/best (0: none)",
        group=RUN_FILES,
        ge=0,
    )
    periodic_eval_episodes: int = opt(
        5,
        "episodes of each --eval-every evaluation (the same seeds each time)",
        group=RUN_FILES,
        ge=1,
        le=MAX_EVAL_EPISODES,
        only_with=(lambda c: c.eval_every > 0, "--eval-every N"),
    )
    checkpoint_every: int = opt(0, "env steps between checkpoints (0: 10 per run)", group=RUN_FILES, ge=0)
    keep_checkpoints: int = opt(
        3, "newest checkpoints kept (0: all); only the newest keeps a replay buffer", group=RUN_FILES, ge=0
    )
    log_every: int = opt(2_000, "env steps between metric rows", group=RUN_FILES, ge=1)
    torch_threads: int = opt(
        1,
        "torch CPU threads of the learner (0: this machine's cores, shared by its workers;"
        " small nets are fastest on 1)",
        ge=0,
        le=MAX_TORCH_THREADS,
    )
    backend: str = opt(
        "local",
        "where training workers run: local | mp (processes here) | ray (a Ray cluster)",
        group=DISTRIBUTION,
        choices=BACKENDS,
    )
    strategy: str = opt(
        "sync",
        "how workers cooperate: sync | a3c | param-avg | param-server",
        group=DISTRIBUTION,
        choices=STRATEGIES,
    )
    num_workers: int = opt(
        1,
        "training workers (backend mp or ray); each has num_envs envs and a model copy",
        group=DISTRIBUTION,
        ge=1,
    )
    ps_mode: str = opt(
        "async",
        "param-server: sync (the server waits for all workers) | async",
        group=DISTRIBUTION,
        choices=("sync", "async"),
        only_with=(lambda c: c.strategy == "param-server", "--strategy param-server (a3c is always async)"),
    )
    max_policy_lag: int = opt(
        10,
        "a3c: drop gradients more than this many updates stale",
        group=DISTRIBUTION,
        ge=0,
        only_with=(lambda c: c.strategy == "a3c", "--strategy a3c (param-server applies every gradient)"),
    )
    sync_every: int = opt(
        10,
        "param-avg: optimizer steps between parameter averages (K)",
        group=DISTRIBUTION,
        ge=1,
        only_with=(lambda c: c.strategy == "param-avg", "--strategy param-avg"),
    )
    compress: str = opt(
        "none",
        "what gradients/parameters travel as: none | fp16 | topk",
        group=DISTRIBUTION,
        choices=lambda: _compress_modes(),
    )
    topk_ratio: float = opt(
        0.01,
        "compress topk: fraction of entries sent; the rest is carried forward",
        group=DISTRIBUTION,
        gt=0,
        le=1,
        only_with=(lambda c: c.compress == "topk", "--compress topk"),
    )
    ray_address: str | None = opt(
        None,
        "backend ray: join this cluster (auto or HOST:PORT); default: a local Ray",
        group=DISTRIBUTION,
        only_with=(lambda c: c.backend == "ray", "--backend ray"),
    )
    ray_cpus_per_worker: float = opt(
        1.0,
        "backend ray: CPUs each training worker reserves",
        group=DISTRIBUTION,
        ge=0,
        only_with=(lambda c: c.backend == "ray", "--backend ray"),
    )
    ray_gpus_per_worker: float = opt(
        0.0,
        "backend ray: GPUs each training worker reserves",
        group=DISTRIBUTION,
        ge=0,
        only_with=(lambda c: c.backend == "ray", "--backend ray"),
    )
    on_env_error: str = opt(
        "restart",
        "an env that raises, hangs or whose worker dies: restart it (fresh envs) | raise",
        group=FAULTS,
        choices=("restart", "raise"),
    )
    step_timeout: float = opt(
        60.0,
        "seconds an env step may take before its worker counts as hung (0: no limit)",
        group=FAULTS,
        ge=0,
    )
    hang_timeout: float = opt(
        60.0,
        "mp/ray: seconds a training worker or the server may show no sign of life before it counts as lost"
        " (0: never)",
        group=FAULTS,
        ge=0,
    )
    max_restarts: int = opt(
        10,
        "env-worker and training-worker restarts allowed before the run stops (with a checkpoint)",
        group=FAULTS,
        ge=0,
    )
    nan_policy: str = opt(
        "raise",
        "NaN/inf in observations, rewards, loss or gradients: raise (stop, keep checkpoints) | skip",
        group=FAULTS,
        choices=("raise", "skip"),
    )
    normalize_obs: bool | None = opt(
        None,
        "normalise observations by their running mean and std, clipped to +-obs_clip (not for pixels)",
    )
    normalize_reward: bool | None = opt(
        None,
        "divide the rewards learned from by the running std of the discounted return (logged"
        " returns stay raw)",
    )
    obs_clip: float = opt(
        10.0,
        "normalised observations are clipped to +-this",
        gt=0,
        only_with=(lambda c: bool(c.normalize_obs), "--normalize-obs"),
    )
    reward_clip: float = opt(
        10.0,
        "scaled rewards are clipped to +-this",
        gt=0,
        only_with=(lambda c: bool(c.normalize_reward), "--normalize-reward"),
    )

    # -- validation ------------------------------------------------------------------------
    def validate(self, *, explicit: Iterable[str] = ()) -> None:
        """Raise ConfigError for the first problem found in the values alone.

        Nothing here looks at this machine (cores, GPUs, the file system: see
        ``shoal.configio.validate``), so a checkpoint made elsewhere validates the same.

        Subclasses add their cross-field rules after ``super().validate(explicit=explicit)``.
        ``explicit`` names the settings the user gave (flags, keywords): a setting that only
        applies with another one (``--sync-every`` without ``--strategy param-avg``) is
        refused when given, or when it differs from its default (a config file may list
        every default, as a saved ``config.yaml`` does).
        """
        check_fields(self)
        c = self
        if c.env_workers is not None and c.env_workers > min(c.num_envs, MAX_ENV_WORKERS):
            raise ConfigError(
                f"env_workers {c.env_workers} is more than num_envs {c.num_envs} (or {MAX_ENV_WORKERS}):"
                " each env worker steps at least one env; lower --env-workers"
            )
        if c.device not in ("auto", "cpu", "cuda") and not (
            c.device.startswith("cuda:") and c.device[5:].isdigit()
        ):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {show(c.device)}")
        if c.backend == "local" and c.num_workers > 1:
            raise ConfigError(
                f"num_workers {c.num_workers} needs --backend mp or ray (local runs one learner)"
            )
        if c.backend == "local" and c.strategy != "sync":
            raise ConfigError(
                f"strategy {c.strategy} needs several workers: add --backend mp (or ray) --num-workers 2"
            )
        if c.backend == "local" and c.compress != "none":
            raise ConfigError(
                f"compress {c.compress} is for several workers (--backend mp or ray):"
                " a local run sends nothing"
            )
        check_only_with(self, explicit)

    @classmethod
    def space_defaults(cls, obs_space: Any, action_space: Any) -> dict[str, Any]:
        """Defaults that depend on the env's spaces: above the class defaults, below an env's
        preset and the user's settings (``shoal.configio.layered`` applies them).

        Here: no normalisation. PPO and A2C turn it on (:func:`normalization`) and add
        their own values for Box actions (continuous control).
        """
        return {"normalize_obs": False, "normalize_reward": False}

    def check_spaces(self, algo: str, env: str, obs_space: Any, action_space: Any) -> None:
        """Refuse, in one line, spaces this algorithm cannot learn on (before any worker starts)."""
        from gymnasium import spaces

        if not isinstance(action_space, (spaces.Discrete, spaces.Box)):
            raise ConfigError(f"{algo} supports Discrete and Box action spaces, {env} has {action_space}")
        problem = observation_problem(obs_space)
        if problem:
            raise ConfigError(
                f"{algo} takes Box, Discrete, MultiDiscrete or MultiBinary observations (uint8 frames of"
                f" at least {MIN_FRAME}x{MIN_FRAME}, HxWxC or CxHxW); {env} has {show(obs_space)}: {problem}"
            )
        if self.normalize_obs and not normalizable(obs_space):
            what = (
                "pixels (uint8 frames, which the network scales itself)"
                if is_pixels(obs_space)
                else (f"{type(obs_space).__name__} observations")
            )
            raise ConfigError(
                f"normalize_obs is for vectors of numbers (a float Box); {env} has {what}:"
                " drop --normalize-obs (or pass --no-normalize-obs)"
            )

    def step_overshoot(self) -> int:
        """How far past ``total_steps`` a run's env steps may end (its last step's size)."""
        return self.num_envs * self.num_workers

    def memory_needed(self, obs_space: Any, action_space: Any) -> dict[str, float]:
        """Rough bytes one learner allocates for these spaces, by the setting that sizes it
        (none by default). A key names the setting(s) to lower: ``"buffer_size"``, or
        ``"num_steps*num_envs"``; :func:`space_bytes` and :func:`space_inputs` help."""
        return {}


@dataclass
class DecoupledConfig(TrainConfig):
    """What every algorithm of decoupled actors and one learner shares (IMPALA, APPO).

    ``num_actors`` actor processes each step ``num_envs`` envs with a copy of the policy and
    send fixed-length trajectories; the learner updates on ``batch_trajectories`` of them at a
    time (``batch_trajectories * rollout_length * num_envs`` env steps per update) and
    publishes its weights, which the actors read every ``refresh_every`` trajectories.
    """

    backend: str = opt(
        "mp",
        "where the actors run: mp (processes on this machine) | ray (Ray actors on any node of a cluster)",
        group=DISTRIBUTION,
        choices=BACKENDS,
    )
    num_actors: int = opt(
        2,
        "actors (processes or Ray actors), each with num_envs envs and a CPU policy copy",
        group=DISTRIBUTION,
        ge=1,
        le=256,
    )
    rollout_length: int = opt(64, "env steps per trajectory an actor sends (per env)", ge=1)
    batch_trajectories: int = opt(
        2, "trajectories per learner update (each rollout_length x num_envs steps)", group=DISTRIBUTION, ge=1
    )
    refresh_every: int = opt(
        1, "trajectories an actor sends between reads of the newest weights", group=DISTRIBUTION, ge=1
    )
    max_policy_lag: int = opt(
        20,
        "drop trajectories acted by a policy more than this many updates older than the learner's (counted)",
        group=DISTRIBUTION,
        ge=0,
    )
    slots_per_actor: int = opt(
        2,
        "trajectory slots per actor: how far it may act ahead of the learner"
        " (2: it acts into one while the learner reads the other)",
        group=DISTRIBUTION,
        ge=1,
        le=64,
    )
    actor_nice: int = opt(
        10,
        "backend mp: niceness added to each actor process, so that the learner, which every actor"
        " waits on, is not preempted by them (0: none)",
        group=DISTRIBUTION,
        ge=0,
        le=19,
        only_with=(lambda c: c.backend == "mp", "--backend mp"),
    )
    ray_cpus_per_worker: float = opt(
        1.0,
        "backend ray: CPUs each actor reserves",
        group=DISTRIBUTION,
        ge=0,
        only_with=(lambda c: c.backend == "ray", "--backend ray"),
    )

    def validate(self, *, explicit: Iterable[str] = ()) -> None:
        super().validate(explicit=explicit)
        c = self
        if c.backend == "local":
            raise ConfigError(
                "impala and appo run actor processes beside the learner: use --backend mp (their default)"
                " or --backend ray"
            )
        if c.ray_gpus_per_worker:
            raise ConfigError("impala and appo actors act on CPU: drop --ray-gpus-per-worker")
        if c.num_workers != 1 or c.strategy != "sync" or c.compress != "none":
            raise ConfigError(
                "impala and appo have one learner and --num-actors actors: drop --num-workers,"
                " --strategy and --compress"
            )
        if c.nan_policy == "skip":
            raise ConfigError(
                "--nan-policy skip is not implemented for impala and appo yet: use --nan-policy raise"
            )

    def step_overshoot(self) -> int:
        # The learner counts every trajectory it receives while it fills its last batch: the
        # batch, the slots that arrive with it, and the stale ones it drops (per actor, those
        # acted before its last weight read: its slots and up to refresh_every more).
        trajectories = self.batch_trajectories + self.num_actors * (
            2 * self.slots_per_actor + self.refresh_every
        )
        return trajectories * self.rollout_length * self.num_envs

    def memory_needed(self, obs_space: Any, action_space: Any) -> dict[str, float]:
        slots = self.num_actors * self.slots_per_actor + self.batch_trajectories
        rows = slots * (self.rollout_length + 1) * self.num_envs
        row = space_bytes(obs_space) + space_bytes(action_space) + 24.0
        return {"num_actors*slots_per_actor*rollout_length*num_envs": rows * row}


MIN_FRAME = 36  # the Nature-DQN encoder (8/4, 4/2 and 3/1 convolutions) needs this much


def observation_problem(space: Any) -> str | None:
    """What makes ``space`` unusable as network input (None: usable)."""
    from gymnasium import spaces

    if not isinstance(space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)):
        return "flatten it, e.g. with gymnasium.wrappers.FlattenObservation"
    shape = space.shape or ()
    if 0 in shape:
        return "it holds no values"
    if isinstance(space, spaces.Box) and space.dtype == "uint8" and len(shape) == 3:
        spatial = shape[:2] if shape[-1] < shape[0] else shape[1:]
        if min(spatial) < MIN_FRAME:
            return f"its frames are {spatial[0]}x{spatial[1]}; resize them or use a float Box"
    return None


def is_pixels(space: Any) -> bool:
    """Whether ``space`` holds image frames (a uint8 Box of three dimensions)."""
    from gymnasium import spaces

    return isinstance(space, spaces.Box) and space.dtype == "uint8" and len(space.shape or ()) == 3


def normalizable(space: Any) -> bool:
    """Whether running mean/std normalisation makes sense for observations of ``space``."""
    from gymnasium import spaces

    return isinstance(space, spaces.Box) and not is_pixels(space) and len(space.shape or ()) > 0


def normalization(obs_space: Any, on: bool = True) -> dict[str, Any]:
    """``normalize_obs``/``normalize_reward`` defaults: ``on``, except for pixels (never
    normalised; their network scales them) and observations that are not vectors."""
    return {
        "normalize_obs": on and normalizable(obs_space),
        "normalize_reward": on and not is_pixels(obs_space),
    }


def check_fields(config: TrainConfig) -> None:
    """Every field holds its declared type and lies within its declared bounds and choices."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        base, optional = base_type(hints[f.name])
        if value is None and optional:
            continue
        if typing.get_origin(base) is tuple:
            ok = isinstance(value, (tuple, list)) and all(is_int(v) for v in value)
        elif base is float:
            ok = _number(value)
            if ok and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        elif base is int:
            ok = is_int(value)
        else:
            ok = isinstance(value, base)
        if not ok:
            raise ConfigError(f"{f.name} must be {kind(base)}, got {show(value)}")
        if is_int(value) and value > MAX_INT:
            raise ConfigError(f"{f.name} must be at most {MAX_INT:.0e}, got {value}")
        meta = f.metadata
        if _number(value):
            problem = _range_error(f.name, value, meta, base is int)
            if problem:
                raise ConfigError(problem)
        if "item_ge" in meta and any(v < meta["item_ge"] for v in value):
            what = meta.get("items", f"{f.name} entries")
            need = "positive integers" if meta["item_ge"] == 1 else f"integers >= {meta['item_ge']}"
            raise ConfigError(f"{what} must be {need}, got {list(value)}")
        choices = meta.get("choices")
        if choices is not None:
            allowed = choices() if callable(choices) else choices
            if value not in allowed:
                text = " or ".join(allowed) if len(allowed) == 2 else "one of " + ", ".join(allowed)
                raise ConfigError(f"{f.name} must be {text}, got {show(value)}")


def check_only_with(config: TrainConfig, explicit: Iterable[str]) -> None:
    """Refuse a setting given where it means nothing (``--sync-every`` without param-avg)."""
    explicit = set(explicit)
    for f in dataclasses.fields(config):
        rule = f.metadata.get("only_with")
        if rule is None:
            continue
        applies, where = rule
        if not applies(config) and (f.name in explicit or getattr(config, f.name) != f.default):
            raise ConfigError(f"{f.name} is for {where}; drop {flag(f.name)}")


def check_run_dir(run_dir: str | None) -> None:
    """The run directory can be made and written (a PermissionError mid-start is a traceback)."""
    if run_dir is None:
        return
    if not run_dir.strip() or "\0" in run_dir:
        raise ConfigError(f"run_dir must be a directory path, got {show(run_dir)}")
    path = Path(run_dir).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir {run_dir} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {run_dir} cannot be created: {existing} is not writable")


def check_replay_batch(config: Any) -> None:
    """A replay minibatch is drawn from the buffer, so it cannot be larger (DQN, SAC, TD3)."""
    if config.batch_size > config.buffer_size:
        raise ConfigError(
            f"batch_size {config.batch_size} is more than buffer_size {config.buffer_size};"
            " lower --batch-size"
        )


def replay_share(config: Any) -> int:
    """Each worker's replay capacity, as ``Algorithm.replay_capacity`` sizes it: workers
    averaged into one learner split its ``buffer_size``; others keep a whole one each."""
    n = config.num_workers
    return -(-config.buffer_size // n) if one_learner(config.strategy, config.ps_mode) else config.buffer_size


def space_bytes(space: Any) -> int:
    """Bytes of one sample of ``space`` as the buffers store it (8 for a Discrete)."""
    shape = space.shape or ()
    itemsize = np.dtype(space.dtype).itemsize if space.dtype is not None else 8
    return int(np.prod(shape, dtype=np.float64)) * itemsize


def space_inputs(space: Any) -> float:
    """Values one sample of ``space`` feeds a network's first layer."""
    return float(np.prod(space.shape or (1,), dtype=np.float64))


def rollout_memory(config: Any, obs_space: Any, action_space: Any) -> dict[str, float]:
    """Bytes of an on-policy learner: its rollout, and actor and critic with their activations."""
    obs_bytes, act_bytes = space_bytes(obs_space), space_bytes(action_space)
    widths = [space_inputs(obs_space), *config.hidden]
    weights = sum(a * b for a, b in zip(widths, widths[1:])) + widths[-1] * 64
    rows = config.num_steps * config.num_envs
    return {
        "num_steps*num_envs": rows * (obs_bytes + act_bytes + 4 * 8.0),
        "hidden": 2 * 4 * 4 * weights + 2 * 4 * 4 * rows * sum(widths),
    }

"""shoal vs Stable-Baselines3 where people train: MuJoCo and Box2D, off-policy, distributed.

Parts (``--part``), each side by side in one run, the same seeds and budgets for both sides:
- ``ppo``: each library's PPO defaults (shoal: ``make_config("ppo", env, {seed, total_steps})``
  as a user gets it; SB3: ``PPO("MlpPolicy", env)``) on HalfCheetah-v5, Hopper-v5 and
  BipedalWalker-v3; and RL-Zoo's HalfCheetah hyperparameters on both libraries (SB3 inside
  ``VecNormalize``, as RL-Zoo trains it; each value mapped onto shoal's settings, those that
  cannot be are listed in the JSON and under the table).
- ``offpolicy``: SAC and TD3 with identical hyperparameters (SB3's defaults) on Hopper-v5;
  and training env steps/s of each on HalfCheetah-v5, timed after learning starts, the
  libraries alternating, medians of ``--repeats`` and their ratio.
- ``distributed``: shoal alone (SB3 has no distributed training): DQN on CartPole-v1 with 1
  worker vs ``param-avg`` with 2 ``mp`` workers at the same total budget, and SAC on
  Pendulum-v1 with 1 worker vs ``sync`` with 2 ``mp`` workers (defaults and presets).

Every run ends with a greedy evaluation of 10 episodes on the seeds shoal's ``evaluate``
plays (SB3 with its ``VecNormalize`` statistics frozen); curves come from an evaluation
every tenth of the budget (shoal's ``--eval-every``, the same episode seeds on both sides).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.bench import machine, plot_curves
from shoal.bench.sb3 import _Clock, _greedy_sb3
from shoal.config import MAX_EVAL_EPISODES, vf_coef_from_sb3

PPO_ENVS = ("HalfCheetah-v5", "Hopper-v5", "BipedalWalker-v3")

# RL-Baselines3-Zoo's hyperparams/ppo.yml, HalfCheetah entry (it trains 1M steps).
RL_ZOO_HALFCHEETAH: dict[str, Any] = dict(
    normalize=True,
    n_envs=1,
    n_steps=512,
    batch_size=64,
    gamma=0.98,
    learning_rate=2.0633e-05,
    ent_coef=0.000401762,
    clip_range=0.1,
    n_epochs=20,
    gae_lambda=0.92,
    max_grad_norm=0.8,
    vf_coef=0.58096,
    log_std_init=-2.0,
    ortho_init=False,
    activation_fn="ReLU",
    net_arch={"pi": [256, 256], "vf": [256, 256]},
)

# Identical hyperparameters for both libraries: SB3's defaults (TD3's 0.1 action noise is
# RL-Zoo's; SB3 has none by default, and (256, 256) networks replace its (400, 300)).
_REPLAY: dict[str, Any] = dict(
    buffer_size=1_000_000,
    learning_starts=100,
    batch_size=256,
    tau=0.005,
    gamma=0.99,
    train_freq=1,
    gradient_steps=1,
    hidden=(256, 256),
)
OFF_POLICY: dict[str, dict[str, Any]] = {
    "sac": dict(_REPLAY, learning_rate=3e-4),
    "td3": dict(
        _REPLAY,
        learning_rate=1e-3,
        policy_delay=2,
        target_policy_noise=0.2,
        target_noise_clip=0.5,
        exploration_noise=0.1,
    ),
}


# -- mapping RL-Zoo onto shoal ---------------------------------------------------------------
def rl_zoo_to_shoal(zoo: dict[str, Any], fields: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(shoal settings, {RL-Zoo key: why it is not mapped}) for an RL-Zoo PPO entry.

    Settings RL-Zoo leaves at SB3's defaults are set to SB3's semantics too: constant learning
    rate and clip range, advantages normalised per minibatch, no value-loss clipping, no KL stop.
    """
    rollout = zoo["n_steps"] * zoo["n_envs"]
    wanted: dict[str, tuple[dict[str, Any], str]] = {
        "normalize": (
            dict(normalize_obs=True, normalize_reward=True, obs_clip=10.0, reward_clip=10.0),
            "VecNormalize(gamma=gamma), clipped at 10",
        ),
        "n_envs": (dict(num_envs=zoo["n_envs"]), ""),
        "n_steps": (dict(num_steps=zoo["n_steps"]), ""),
        "batch_size": (dict(num_minibatches=rollout // zoo["batch_size"]), "as minibatches per epoch"),
        "gamma": (dict(gamma=zoo["gamma"]), ""),
        "learning_rate": (dict(learning_rate=zoo["learning_rate"], anneal_lr=False), ""),
        "ent_coef": (dict(ent_coef=zoo["ent_coef"]), ""),
        "clip_range": (dict(clip_coef=zoo["clip_range"], anneal_clip=False), ""),
        "n_epochs": (dict(update_epochs=zoo["n_epochs"]), ""),
        "gae_lambda": (dict(gae_lambda=zoo["gae_lambda"]), ""),
        "max_grad_norm": (dict(max_grad_norm=zoo["max_grad_norm"]), ""),
        "vf_coef": (
            dict(vf_coef=vf_coef_from_sb3(zoo["vf_coef"])),
            "x2: SB3's value loss is the squared error, shoal's half",
        ),
        "log_std_init": (dict(log_std_init=zoo["log_std_init"]), ""),
        "activation_fn": (dict(activation=zoo["activation_fn"].lower()), ""),
        "ortho_init": (dict(ortho_init=zoo["ortho_init"]), ""),
    }
    net = zoo["net_arch"]
    if net["pi"] == net["vf"]:  # shoal's actor and critic are separate bodies of one shape
        wanted["net_arch"] = (dict(hidden=tuple(net["pi"])), "")
    settings: dict[str, Any] = dict(clip_vloss=False, norm_adv=True, target_kl=None)
    unmapped: dict[str, str] = {}
    if "net_arch" not in wanted:
        unmapped["net_arch"] = f"{net}: shoal's actor and critic have the same hidden sizes"
    for key, (values, _) in wanted.items():
        missing = sorted(set(values) - fields)
        if missing:
            unmapped[key] = f"{zoo[key]}: this shoal has no {', '.join(missing)} setting"
        else:
            settings.update(values)
    return {k: v for k, v in settings.items() if k in fields}, unmapped


# -- one run of each library ---------------------------------------------------------------
def run_shoal(algo: str, config: Any) -> dict[str, Any]:
    """Train through ``shoal.launch.train`` (any backend); the curve from metrics.jsonl."""
    from shoal import launch

    shutil.rmtree(config.run_dir, ignore_errors=True)  # this benchmark's own scratch run
    summary, run_dir = launch.train(algo, config, progress=False)
    curve, evaluating = [], 0.0
    with open(Path(run_dir) / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if "eval_return" in row:
                curve.append((row["env_steps"], row["eval_return"]))
                if row["env_steps"] < summary["env_steps"]:  # inside the loop's wall time
                    evaluating += row.get("eval_seconds", 0.0)
    out = {
        "final": summary["mean_return"],
        "curve": curve,
        "wall": summary["wall_time"] - evaluating,  # training only, as on SB3's side
        "steps": summary["env_steps"],
    }
    if "best_eval_return" in summary:  # what `shoal eval RUN --best` gives, on the final's episodes
        from shoal.agent import load
        from shoal.training.trainer import env_of, evaluate

        agent = load(run_dir, best=True)
        play = env_of(agent.config, training=False)
        out["kept_best"] = evaluate(agent.algorithm, play, config.eval_episodes, config.seed)["mean_return"]
    return out


def run_sb3(
    model: Any,
    env_id: str,
    steps: int,
    seed: int,
    every: int,
    episodes: tuple[int, int],
    vec_normalize: Any = None,
) -> dict[str, Any]:
    """Train an SB3 model; greedy evaluations every ``every`` env steps (clock paused) and at
    the end, on the episode seeds of shoal's periodic and final evaluations. The policy of the
    best periodic evaluation is kept, as SB3's ``EvalCallback`` keeps ``best_model``, and
    scored on the final's episodes (``kept_best``), as ``shoal eval --best`` scores shoal's."""
    from stable_baselines3.common.callbacks import BaseCallback

    def greedy(n: int, eval_seed: int) -> float:
        frozen = vec_normalize.normalize_obs if vec_normalize is not None else None
        return _greedy_sb3(model, env_id, n, eval_seed, frozen)

    def snapshot() -> tuple[dict[str, Any], Any]:
        weights = {k: v.detach().clone() for k, v in model.policy.state_dict().items()}
        return weights, copy.deepcopy(vec_normalize.obs_rms) if vec_normalize is not None else None

    clock, curve, state = _Clock(), [], {"next": every}
    best: dict[str, Any] = {"score": -math.inf, "kept": None}

    def evaluate_curve_point(n: int) -> None:
        score = greedy(episodes[0], seed + MAX_EVAL_EPISODES)
        curve.append((n, score))
        if score > best["score"]:  # strictly better, as shoal keeps its best
            best.update(score=score, kept=snapshot())

    class Curve(BaseCallback):
        def _on_step(self) -> bool:
            n = self.model.num_timesteps
            if every and n >= state["next"] and n < steps:  # the end: the final evaluation below
                state["next"] += every
                paused = time.perf_counter()
                evaluate_curve_point(n)
                clock.paused += time.perf_counter() - paused
            return True

    clock.start = time.perf_counter()
    model.learn(total_timesteps=steps, callback=Curve())
    wall = clock.elapsed()
    if vec_normalize is not None:
        vec_normalize.training = False
    final = greedy(episodes[1], seed)
    out = {"final": final, "curve": curve, "wall": wall, "steps": model.num_timesteps}
    if every:
        evaluate_curve_point(model.num_timesteps)
        weights, obs_rms = best["kept"]
        model.policy.load_state_dict(weights)
        if vec_normalize is not None:
            vec_normalize.obs_rms = obs_rms
        out["kept_best"] = greedy(episodes[1], seed)
    model.get_env().close()
    return out


def _evals(config: dict[str, Any], args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """shoal's evaluation settings for a run of ``steps``: the protocol both sides follow.

    One checkpoint, at the end: SB3 saves none, and a checkpoint boundary starts fresh
    episodes (for an exact resume), which would cut MuJoCo's 1,000-step episodes."""
    return {
        **config,
        "checkpoint_every": steps,
        "eval_episodes": args.eval_episodes,
        "eval_every": max(steps // args.curve_points, 1),
        "periodic_eval_episodes": args.curve_episodes,
    }


def _wanted(args: argparse.Namespace, row: str) -> bool:
    """Whether ``--rows`` (substrings of row names, any case) selects ``row``."""
    return not args.rows or any(word.lower() in row.lower() for word in args.rows)


def _attempt(side: str, seed: int, row: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One run; a failure is recorded (and printed) rather than ending an hour-long part."""
    try:
        result = {"seed": seed, **run()}
        print(f"  {row}, seed {seed}: {side} {result['final']:.1f} ({result['wall']:.0f} s)", flush=True)
    except Exception as e:  # noqa: BLE001 - the benchmark goes on; the JSON says what failed
        traceback.print_exc()
        result = {"seed": seed, "final": None, "curve": [], "error": f"{type(e).__name__}: {e}"}
        print(f"  {row}, seed {seed}: {side} FAILED: {result['error']}", flush=True)
    return result


def _sides(
    args: argparse.Namespace, row: str, env_id: str, steps: int, seeds: list[int], runs: dict[str, Callable]
) -> dict:
    """Each side of a row for each seed, one after the other, seed by seed; the row so far is
    written to the JSON after every seed (``args.keep``), so that a stopped part keeps it."""
    runs = {side: run for side, run in runs.items() if not args.sides or side in args.sides}
    out: dict[str, Any] = {"env": env_id, "budget": steps, "sides": {side: [] for side in runs}}
    for seed in seeds:
        for side, run in runs.items():
            out["sides"][side].append(_attempt(side, seed, row, lambda run=run, seed=seed: run(seed)))
        args.keep(row, out)
    return out


# -- part: ppo -----------------------------------------------------------------------------
def sb3_ppo_defaults(env_id: str, seed: int) -> tuple[Any, Any]:
    from stable_baselines3 import PPO

    return PPO("MlpPolicy", env_id, seed=seed, device="cpu"), None


def sb3_ppo_rl_zoo(env_id: str, seed: int, zoo: dict[str, Any]) -> tuple[Any, Any]:
    """SB3's PPO as RL-Zoo builds it: VecNormalize (with the algorithm's gamma) around n_envs envs."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    envs = make_vec_env(env_id, n_envs=zoo["n_envs"], seed=seed)
    if zoo["normalize"]:
        envs = VecNormalize(envs, gamma=zoo["gamma"])
    activation = getattr(torch.nn, zoo["activation_fn"])
    model = PPO(
        "MlpPolicy",
        envs,
        n_steps=zoo["n_steps"],
        batch_size=zoo["batch_size"],
        gamma=zoo["gamma"],
        learning_rate=zoo["learning_rate"],
        ent_coef=zoo["ent_coef"],
        clip_range=zoo["clip_range"],
        n_epochs=zoo["n_epochs"],
        gae_lambda=zoo["gae_lambda"],
        max_grad_norm=zoo["max_grad_norm"],
        vf_coef=zoo["vf_coef"],
        policy_kwargs=dict(
            log_std_init=zoo["log_std_init"],
            ortho_init=zoo["ortho_init"],
            activation_fn=activation,
            net_arch=zoo["net_arch"],
        ),
        seed=seed,
        device="cpu",
    )
    return model, envs if zoo["normalize"] else None


def part_ppo(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    episodes = (args.curve_episodes, args.eval_episodes)
    results: dict[str, Any] = {}

    def shoal_side(env_id: str, settings: dict[str, Any], tag: str, steps: int) -> Callable[[int], dict]:
        def run(seed: int) -> dict[str, Any]:
            base = {"seed": seed, "total_steps": steps, "run_dir": str(work / f"{tag}-{seed}"), **settings}
            return run_shoal("ppo", make_config("ppo", env_id, _evals(base, args, steps)))

        return run

    def sb3_side(env_id: str, build: Callable[[int], tuple[Any, Any]], steps: int) -> Callable[[int], dict]:
        def run(seed: int) -> dict[str, Any]:
            model, vec_normalize = build(seed)
            every = max(steps // args.curve_points, 1)
            return run_sb3(model, env_id, steps, seed, every, episodes, vec_normalize)

        return run

    steps = args.ppo_steps
    for env_id in PPO_ENVS:
        row = f"defaults, {env_id}"
        if not _wanted(args, row):
            continue
        results[row] = _sides(
            args,
            row,
            env_id,
            steps,
            seeds,
            {
                "shoal": shoal_side(env_id, {}, f"ppo-defaults-{env_id}", steps),
                "sb3": sb3_side(env_id, lambda seed, e=env_id: sb3_ppo_defaults(e, seed), steps),
            },
        )
    env_id, steps = "HalfCheetah-v5", args.rl_zoo_steps
    fields = set(ALGORITHMS["ppo"].config_class.__dataclass_fields__)
    settings, unmapped = rl_zoo_to_shoal(RL_ZOO_HALFCHEETAH, fields)
    row = f"RL-Zoo hyperparameters, {env_id}"
    if _wanted(args, row):
        results[row] = _sides(
            args,
            row,
            env_id,
            steps,
            seeds,
            {
                "shoal": shoal_side(env_id, settings, f"ppo-rlzoo-{env_id}", steps),
                "sb3": sb3_side(env_id, lambda seed: sb3_ppo_rl_zoo(env_id, seed, RL_ZOO_HALFCHEETAH), steps),
            },
        )
        results[row].update(rl_zoo=RL_ZOO_HALFCHEETAH, shoal_settings=settings, not_mapped=unmapped)
    return {"rows": results, "algo": "PPO"}


# -- part: offpolicy -----------------------------------------------------------------------
def sb3_off_policy(algo: str, env_id: str, seed: int, settings: dict[str, Any]) -> Any:
    """SB3's SAC or TD3 with ``settings`` (shoal's names), argument for argument."""
    import gymnasium as gym
    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.noise import NormalActionNoise

    common = dict(
        learning_rate=settings["learning_rate"],
        buffer_size=settings["buffer_size"],
        learning_starts=settings["learning_starts"],
        batch_size=settings["batch_size"],
        tau=settings["tau"],
        gamma=settings["gamma"],
        train_freq=settings["train_freq"],
        gradient_steps=settings["gradient_steps"],
        policy_kwargs={"net_arch": list(settings["hidden"])},
        seed=seed,
        device="cpu",
    )
    if algo == "sac":
        return SAC("MlpPolicy", env_id, **common)  # ent_coef "auto" from 1.0, target -|A|
    dims = gym.make(env_id).action_space.shape
    noise = NormalActionNoise(np.zeros(dims), settings["exploration_noise"] * np.ones(dims))
    return TD3(
        "MlpPolicy",
        env_id,
        policy_delay=settings["policy_delay"],
        target_policy_noise=settings["target_policy_noise"],
        target_noise_clip=settings["target_noise_clip"],
        action_noise=noise,  # on actions scaled to [-1, 1], as shoal's exploration_noise
        **common,
    )


def shoal_off_policy_sps(
    algo: str, env_id: str, seed: int, steps: int, work: Path, threads: int = 1
) -> float:
    """shoal's env steps/s over ``steps`` env steps after learning starts (no checkpoint inside)."""
    from shoal.training.trainer import Trainer

    settings = OFF_POLICY[algo]
    start = settings["learning_starts"]
    run_dir = work / f"speed-{algo}-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {
        **settings,
        "seed": seed,
        "total_steps": start + steps,
        "run_dir": str(run_dir),
        "eval_episodes": 1,
        "checkpoint_every": 10**12,
        "vectorization": "sync",
        "torch_threads": threads,
    }
    config = make_config(algo, env_id, overrides, presets=False)
    marks: dict[str, float] = {}

    def on_update(t: Trainer) -> bool:
        if "begin" not in marks and t.env_steps >= start:
            marks["begin"], marks["from"] = time.perf_counter(), t.env_steps
        if t.env_steps >= start + steps:
            marks["end"], marks["to"] = time.perf_counter(), t.env_steps
            return True  # stop here: the final evaluation is not timed, nor needed
        return False

    Trainer(ALGORITHMS[algo], config, progress=False).train(on_update=on_update)
    shutil.rmtree(run_dir, ignore_errors=True)
    return (marks["to"] - marks["from"]) / (marks["end"] - marks["begin"])


def sb3_off_policy_sps(algo: str, env_id: str, seed: int, steps: int, threads: int = 1) -> float:
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(threads)  # as shoal's learner sets its torch_threads
    start = OFF_POLICY[algo]["learning_starts"]
    marks: dict[str, float] = {}

    class Clock(BaseCallback):
        def _on_step(self) -> bool:  # after each env step; the first gradient step follows `start`
            if self.num_timesteps == start + 1:
                marks["begin"] = time.perf_counter()
            if self.num_timesteps == start + 1 + steps:
                marks["end"] = time.perf_counter()
            return True

    model = sb3_off_policy(algo, env_id, seed, OFF_POLICY[algo])
    model.learn(start + steps + 1, callback=Clock())
    model.get_env().close()
    return steps / (marks["end"] - marks["begin"])


def part_offpolicy(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    steps, seeds = args.offpolicy_steps, list(range(args.first_seed, args.first_seed + args.seeds))
    episodes = (args.curve_episodes, args.eval_episodes)
    every = max(steps // args.curve_points, 1)
    env_id = "Hopper-v5"
    results: dict[str, Any] = {"rows": {}, "algo": "SAC and TD3", "settings": OFF_POLICY}
    for algo in ("sac", "td3"):
        if algo not in ALGORITHMS:
            print(f"  {algo}: skipped, this shoal has no {algo}", flush=True)
            continue
        settings = OFF_POLICY[algo]

        def shoal_run(seed: int, algo: str = algo, settings: dict = settings) -> dict[str, Any]:
            base = {**settings, "seed": seed, "total_steps": steps, "run_dir": str(work / f"{algo}-{seed}")}
            base["torch_threads"] = 1  # SB3's here too (main): two threads crawl beside other runs
            return run_shoal(algo, make_config(algo, env_id, _evals(base, args, steps), presets=False))

        def sb3_run(seed: int, algo: str = algo, settings: dict = settings) -> dict[str, Any]:
            model = sb3_off_policy(algo, env_id, seed, settings)
            return run_sb3(model, env_id, steps, seed, every, episodes)

        row = f"{algo.upper()}, {env_id}"
        if _wanted(args, row):
            results["rows"][row] = _sides(
                args, row, env_id, steps, seeds, {"shoal": shoal_run, "sb3": sb3_run}
            )
    speed: dict[str, Any] = {"env": "HalfCheetah-v5", "timed_steps": args.speed_steps}
    if not _wanted(args, f"speed, {speed['env']}"):
        return results
    for algo in (a for a in ("sac", "td3") if a in ALGORITHMS):
        runs: dict[str, list[float]] = {"shoal": [], "sb3": []}
        for r in range(args.repeats):
            for lib in ("sb3", "shoal") if r % 2 == 0 else ("shoal", "sb3"):
                if lib == "shoal":
                    sps = shoal_off_policy_sps(algo, speed["env"], r + 1, args.speed_steps, work)
                else:
                    sps = sb3_off_policy_sps(algo, speed["env"], r + 1, args.speed_steps)
                runs[lib].append(sps)
                print(f"  {algo} env steps/s, repeat {r}: {lib} {sps:,.1f}", flush=True)
        med = {lib: statistics.median(v) for lib, v in runs.items()}
        speed[algo] = {"runs": runs, "median": med, "ratio": med["shoal"] / med["sb3"]}
    results["speed"] = speed
    return results


# -- part: distributed ---------------------------------------------------------------------
def part_distributed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    seeds = list(range(1, args.dist_seeds + 1))
    plan = [("dqn", "CartPole-v1", args.dqn_steps, "param-avg")]
    if "sac" in ALGORITHMS:
        plan.append(("sac", "Pendulum-v1", args.sac_steps, "sync"))
    else:
        print("  sac: skipped, this shoal has no sac", flush=True)
    results: dict[str, Any] = {"rows": {}, "algo": "shoal, 2 workers vs 1"}
    for algo, env_id, budget, strategy in plan:
        steps = budget or make_config(algo, env_id, {}).total_steps  # None: the preset's budget
        two = {"strategy": strategy, "backend": "mp", "num_workers": 2}

        def run(seed: int, extra: dict, tag: str, algo: str = algo, env_id: str = env_id, steps: int = steps):
            base = {"seed": seed, "total_steps": steps, "run_dir": str(work / f"{tag}-{seed}"), **extra}
            return run_shoal(algo, make_config(algo, env_id, _evals(base, args, steps)))

        row = f"{algo.upper()}, {env_id}, {strategy} on mp"
        if not _wanted(args, row):
            continue
        results["rows"][row] = _sides(
            args,
            row,
            env_id,
            steps,
            seeds,
            {
                "2 workers": lambda seed, a=algo, t=two: run(seed, t, f"{a}-2w"),
                "1 worker": lambda seed, a=algo: run(seed, {}, f"{a}-1w"),
            },
        )
    return results


# -- report --------------------------------------------------------------------------------
def merge_row(before: dict[str, Any] | None, measured: dict[str, Any]) -> dict[str, Any]:
    """``measured`` with the runs of ``before`` (the same row, an earlier invocation) whose
    seeds it did not run; a different budget makes ``before`` stale, so it is dropped."""
    if not before or before.get("budget") != measured.get("budget"):
        return measured
    sides = {}
    for side in {**before["sides"], **measured["sides"]}:
        runs = measured["sides"].get(side, [])
        seen = {r["seed"] for r in runs}
        kept = [r for r in before["sides"].get(side, []) if r["seed"] not in seen]
        sides[side] = sorted(kept + runs, key=lambda r: r["seed"])
    return {**before, **measured, "sides": sides}


def _stats(runs: list[dict[str, Any]]) -> tuple[float, float, int]:
    finals = [r["final"] for r in runs if r.get("final") is not None]
    if not finals:
        return float("nan"), float("nan"), 0
    return float(np.mean(finals)), float(np.std(finals)), len(finals)


def late_mean(run: dict[str, Any], budget: int) -> float | None:
    """The mean of a run's curve evaluations in the second half of its budget: where a final
    evaluation catches a curve that swings (DQN on CartPole), how much of the time it held."""
    late = [ret for step, ret in run.get("curve") or [] if step > budget / 2]
    return float(np.mean(late)) if late else None


def table(name: str, part: dict[str, Any]) -> str:
    """The part's markdown table: final greedy returns, mean +- std over seeds."""
    rows = part["rows"]
    if not rows and not part.get("speed"):
        return f"{name}: no rows"
    lines: list[str] = []
    notes: list[str] = []
    if rows:
        # every side any row has (a run of --sides sb3 alone has one: nothing to compare)
        sides = list(dict.fromkeys(side for res in rows.values() for side in res["sides"]))
        compare = len(sides) > 1
        head = [f"{part['algo']}: final greedy return, mean +- std over seeds", "budget", *sides]
        head += [f"{sides[0]} >= {sides[1]}"] if compare else []
        lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for row, res in rows.items():
            cells, means = [row, f"{res['budget']:,}"], []
            for side in sides:
                mean, std, n = _stats(res["sides"].get(side, []))
                means.append(mean)
                cells.append(f"{mean:.1f} +- {std:.1f} ({n})")
            if compare:
                cells.append("yes" if means[0] >= means[1] else "no" if means[0] < means[1] else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
            if res.get("not_mapped"):
                why = "; ".join(f"{k} {v}" for k, v in res["not_mapped"].items())
                notes.append(f"Not mapped onto shoal ({row}): {why}")
    for note in notes:  # under the table, which a blank line would end
        lines += ["", note]
    if rows:
        lines += ["", f"| second half of the budget: mean of the curve's evaluations | {' | '.join(sides)} |"]
        lines += ["|---" * (len(sides) + 1) + "|"]
        for row, res in rows.items():
            cells = []
            for side in sides:
                late = [late_mean(r, res["budget"]) for r in res["sides"].get(side, [])]
                late = [x for x in late if x is not None]
                cells.append(f"{np.mean(late):.1f} +- {np.std(late):.1f} ({len(late)})" if late else "-")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    kept = {
        row: res
        for row, res in rows.items()
        if any("kept_best" in r for rs in res["sides"].values() for r in rs)
    }
    if kept:  # what a user keeps with --eval-every (SB3: EvalCallback's best_model)
        title = "kept best: the best periodic evaluation's policy, scored as the final"
        lines += ["", f"| {title} | {' | '.join(sides)} |", "|---" * (len(sides) + 1) + "|"]
        for row, res in kept.items():
            cells = []
            for side in sides:
                runs = [{"final": r["kept_best"]} for r in res["sides"].get(side, []) if "kept_best" in r]
                mean, std, n = _stats(runs)
                cells.append(f"{mean:.1f} +- {std:.1f} ({n})" if n else "-")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for algo in ("sac", "td3"):
        s = part.get("speed", {}).get(algo)
        if s:
            lines += [
                "",
                f"| {algo.upper()} training env steps/s on {part['speed']['env']} after learning starts"
                f" (median of {len(s['runs']['shoal'])}) | shoal | SB3 | shoal / SB3 | target |",
                "|---|---|---|---|---|",
                f"| {part['speed']['timed_steps']:,} timed env steps | {s['median']['shoal']:,.1f} |"
                f" {s['median']['sb3']:,.1f} | **{s['ratio']:.2f}x** | {'>= 2x' if algo == 'sac' else '-'} |",
            ]
    return "\n".join(lines).strip()


def plot(name: str, part: dict[str, Any], path: Path) -> None:
    panels = {
        f"{row}": {side: [r["curve"] for r in runs] for side, runs in res["sides"].items()}
        for row, res in part["rows"].items()
    }
    if panels:
        plot_curves(panels, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal bench zoo", description=__doc__.split("\n")[0])
    names = ["ppo", "offpolicy", "distributed"]
    parser.add_argument("--part", nargs="+", default=["all"], choices=[*names, "all"])
    parser.add_argument("--seeds", type=int, default=2, help="ppo, offpolicy: seeds per row (1..N)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=1,
        help="ppo, offpolicy: the first of the --seeds seeds; a row's runs of other seeds measured"
        " before (same budget) are kept, so a row can be completed seed by seed",
    )
    parser.add_argument("--ppo-steps", type=int, default=300_000, help="ppo: env steps per run")
    parser.add_argument(
        "--rl-zoo-steps", type=int, default=300_000, help="ppo: env steps of the RL-Zoo runs (RL-Zoo: 1M)"
    )
    parser.add_argument("--offpolicy-steps", type=int, default=30_000, help="offpolicy: env steps per run")
    parser.add_argument("--speed-steps", type=int, default=3_000, help="offpolicy: timed env steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="offpolicy: timed runs per library")
    parser.add_argument("--dist-seeds", type=int, default=5, help="distributed: seeds per row (1..N)")
    parser.add_argument("--dqn-steps", type=int, default=200_000, help="distributed: DQN total env steps")
    parser.add_argument(
        "--sac-steps", type=int, default=None, help="distributed: SAC total env steps (default: the preset's)"
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[],
        metavar="TEXT",
        help="only the rows whose name contains one of these (e.g. Hopper, RL-Zoo, speed, DQN);"
        " the JSON keeps the other rows measured before",
    )
    parser.add_argument(
        "--sides",
        nargs="+",
        default=[],
        metavar="SIDE",
        help="only these sides of the rows (shoal, sb3; distributed: '1 worker', '2 workers'); the"
        " runs of the other sides measured before stay",
    )
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes of each final evaluation")
    parser.add_argument("--curve-points", type=int, default=10, help="evaluations per run for the curves")
    parser.add_argument("--curve-episodes", type=int, default=5, help="episodes of each curve evaluation")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/zoo.json)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny budgets, to check the harness (results go to a temp dir)"
    )
    args = parser.parse_args(argv)
    parts = names if "all" in args.part else args.part
    if args.quick:
        args.seeds = args.dist_seeds = args.repeats = 1
        args.ppo_steps = args.rl_zoo_steps = 2_048
        args.offpolicy_steps, args.speed_steps = 400, 200
        args.dqn_steps, args.sac_steps = 4_000, 1_500
        args.eval_episodes, args.curve_points, args.curve_episodes = 2, 2, 1
    default = Path(tempfile.gettempdir()) / "shoal-zoo-quick" if args.quick else Path("benchmarks/results")
    out = Path(args.out) if args.out else default / "zoo.json"
    work = out.parent / "zoo_runs"
    torch.set_num_threads(1)  # shoal's learner default (torch_threads 1): the same for SB3
    report: dict[str, Any] = {
        "benchmark": "zoo",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("numpy", "gymnasium", "torch", "stable_baselines3", "mujoco", "Box2D"),
    }
    if out.exists():  # keep parts measured by earlier invocations
        report = {**json.loads(out.read_text()), **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    run = {"ppo": part_ppo, "offpolicy": part_offpolicy, "distributed": part_distributed}

    def keeper(name: str) -> Callable[[str, dict[str, Any]], None]:
        def keep(row: str, measured: dict[str, Any]) -> None:  # a part takes hours: keep each row
            rows = report.setdefault(name, {}).setdefault("rows", {})
            rows[row] = merge_row(rows.get(row), measured)
            out.write_text(json.dumps(report, indent=1, default=str))

        return keep

    for name in parts:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        args.keep = keeper(name)
        result = run[name](args, work)
        before = report.get(name, {})
        earlier = before.get("rows", {})  # rows and seeds measured apart stay
        result["rows"] = {**earlier, **{r: merge_row(earlier.get(r), m) for r, m in result["rows"].items()}}
        if "speed" in before and result.get("speed", {}).keys() <= {"env", "timed_steps"}:
            result["speed"] = before["speed"]
        settings = {k: v for k, v in vars(args).items() if k != "keep"}
        report[name] = {**result, "settings": settings, "seconds": time.perf_counter() - start}
        plot(name, report[name], out.parent / f"zoo_{name}.png")
        out.write_text(json.dumps(report, indent=1, default=str))  # after each part: hours of runs
    text = "\n\n".join(f"### {n}\n\n{table(n, report[n])}" for n in names if n in report)
    print("\n" + text)
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {out}, {out.with_suffix('.md')} and the PNGs beside them")
    return 0

"""shoal vs Stable-Baselines3 on identical hyperparameters, side by side in one run.

Parts (``--part``):
- ``throughput``: PPO training env steps/s on CartPole-v1 with 8 envs (shoal's CartPole
  preset, mapped one to one onto SB3's PPO arguments), alternating the two libraries
  ``--repeats`` times; medians and their ratio.
- ``time-to-solve``: wall time until PPO first reaches a mean greedy return >= 475 on
  CartPole-v1, evaluated every ``--eval-every`` env steps with 10 episodes on a fresh env
  (the same protocol for both; evaluation time is excluded); median over seeds.
- ``curves``: learning curves of PPO over ``--seeds`` seeds on CartPole-v1, Acrobot-v1 and
  Pendulum-v1 at the same budget and hyperparameters; final greedy returns; a PNG.

Both libraries run on the CPU with the same torch thread count; SB3 uses DummyVecEnv (its
default), shoal its default (``vectorization=auto``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from shoal.agent import make_config
from shoal.algos import PPO
from shoal.bench import machine, plot_curves
from shoal.config import sb3_vf_coef
from shoal.training.trainer import EVAL_SEED_OFFSET, Trainer, evaluate

THRESHOLD = 475.0


def sb3_ppo_kwargs(config: Any) -> dict[str, Any]:
    """SB3 PPO's arguments for shoal's PPO hyperparameters, one to one (the policy aside)."""

    def linear(start: float) -> Any:
        return lambda progress: progress * start  # progress goes from 1 to 0

    return dict(
        n_steps=config.num_steps,
        batch_size=config.num_steps * config.num_envs // config.num_minibatches,
        n_epochs=config.update_epochs,
        gamma=config.gamma,
        gae_lambda=config.gae_lambda,
        learning_rate=linear(config.learning_rate) if config.anneal_lr else config.learning_rate,
        clip_range=linear(config.clip_coef) if config.anneal_clip else config.clip_coef,
        clip_range_vf=None,
        normalize_advantage=config.norm_adv,
        ent_coef=config.ent_coef,
        vf_coef=sb3_vf_coef(config.vf_coef),  # the same weight on SB3's whole squared error
        max_grad_norm=config.max_grad_norm,
        target_kl=config.target_kl,
    )


def sb3_ppo(env_id: str, config: Any, seed: int, verbose: int = 0) -> Any:
    """SB3's PPO with shoal's hyperparameters, argument for argument."""
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.env_util import make_vec_env

    envs = make_vec_env(env_id, n_envs=config.num_envs, seed=seed)
    return SB3PPO(
        "MlpPolicy",
        envs,
        **sb3_ppo_kwargs(config),
        policy_kwargs={
            "net_arch": {"pi": list(config.hidden), "vf": list(config.hidden)},
            "log_std_init": config.log_std_init,
        },
        seed=seed,
        device="cpu",
        verbose=verbose,
    )


def shoal_config(env_id: str, seed: int, run_dir: str, **overrides: Any) -> Any:
    # SB3 has no value-loss clipping by default, and its PPO normalises nothing without a
    # VecNormalize wrapper: switch both off for identical updates.
    off = {"clip_vloss": False, "normalize_obs": False, "normalize_reward": False}
    return make_config("ppo", env_id, {"seed": seed, "run_dir": run_dir, **off, **overrides})


class _Clock:
    """Wall time of training only: evaluation pauses it."""

    def __init__(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused


def _greedy_sb3(
    model: Any, env_id: str, episodes: int, seed: int, obs_filter: Callable[[Any], Any] | None = None
) -> float:
    """shoal's ``evaluate`` protocol for an SB3 model: the same episode seeds, raw returns.

    ``obs_filter``: what the model sees of an observation, e.g. a ``VecNormalize``'s frozen
    ``normalize_obs`` (RL-Zoo evaluates so, with raw rewards)."""
    env = gym.make(env_id)
    total = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + EVAL_SEED_OFFSET + k)
        done, ret = False, 0.0
        while not done:
            seen = obs if obs_filter is None else obs_filter(obs)
            action, _ = model.predict(seen, deterministic=True)
            obs, r, term, trunc, _ = env.step(action)
            ret, done = ret + float(r), term or trunc
        total.append(ret)
    env.close()
    return float(np.mean(total))


def run_shoal(
    env_id: str,
    seed: int,
    steps: int,
    out: Path,
    eval_every: int = 0,
    stop_at: float | None = None,
    eval_episodes: int = 10,
    trainer: Trainer | None = None,
) -> dict[str, Any]:
    """Train shoal's PPO (or ``trainer``, set up for ``env_id`` and ``seed``); optionally
    evaluate every ``eval_every`` steps (clock paused)."""
    if trainer is None:
        shutil.rmtree(out, ignore_errors=True)  # the benchmark's own scratch run, from an earlier run
        config = shoal_config(env_id, seed, str(out), total_steps=steps, eval_episodes=eval_episodes)
        trainer = Trainer(PPO, config, progress=False)
    clock, curve, state = _Clock(), [], {"next": eval_every, "solved_at": None}

    def check(t: Trainer) -> bool:
        if not eval_every or t.env_steps < state["next"]:
            return False
        state["next"] += eval_every
        paused = time.perf_counter()
        score = evaluate(t.algo, env_id, eval_episodes, seed)["mean_return"]
        clock.paused += time.perf_counter() - paused
        curve.append((t.env_steps, clock.elapsed(), score))
        if stop_at is not None and score >= stop_at:
            state["solved_at"] = (t.env_steps, clock.elapsed())
            return True
        return False

    summary = trainer.train(on_update=check)
    wall = summary["wall_time"] - clock.paused  # the loop only: not the final evaluation
    return {
        "wall": wall,
        "steps": trainer.env_steps,
        "sps": trainer.env_steps / wall,
        "curve": curve,
        "solved_at": state["solved_at"],
        "final": summary.get("mean_return"),
    }


def run_sb3(
    env_id: str,
    seed: int,
    steps: int,
    eval_every: int = 0,
    stop_at: float | None = None,
    eval_episodes: int = 10,
    model: Any = None,
) -> dict[str, Any]:
    """SB3's PPO with shoal's hyperparameters (or ``model``), as :func:`run_shoal`."""
    from stable_baselines3.common.callbacks import BaseCallback

    if model is None:
        config = shoal_config(env_id, seed, "/dev/null", total_steps=steps)
        model = sb3_ppo(env_id, config, seed)
    clock, curve, state = _Clock(), [], {"next": eval_every, "solved_at": None}

    class Check(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            n = self.model.num_timesteps
            if not eval_every or n < state["next"]:
                return
            state["next"] += eval_every
            paused = time.perf_counter()
            score = _greedy_sb3(self.model, env_id, eval_episodes, seed)
            clock.paused += time.perf_counter() - paused
            curve.append((n, clock.elapsed(), score))
            if stop_at is not None and score >= stop_at:
                state["solved_at"] = (n, clock.elapsed())
                self.model._shoal_stop = True  # noqa: SLF001

        def _on_rollout_start(self) -> None:
            if getattr(self.model, "_shoal_stop", False):
                raise StopIteration

    clock.start = time.perf_counter()
    with contextlib.suppress(StopIteration):
        model.learn(total_timesteps=steps, callback=Check())
    wall = clock.elapsed()
    final = _greedy_sb3(model, env_id, 20, seed)
    model.get_env().close()
    return {
        "wall": wall,
        "steps": model.num_timesteps,
        "sps": model.num_timesteps / wall,
        "curve": curve,
        "solved_at": state["solved_at"],
        "final": final,
    }


def part_throughput(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    rows: dict[str, list[float]] = {"shoal": [], "sb3": []}
    for r in range(args.repeats):
        order = ["shoal", "sb3"] if r % 2 == 0 else ["sb3", "shoal"]
        for lib in order:
            if lib == "shoal":
                res = run_shoal("CartPole-v1", 1, args.throughput_steps, out / f"tp-shoal-{r}")
            else:
                res = run_sb3("CartPole-v1", 1, args.throughput_steps)
            rows[lib].append(res["sps"])
            print(f"  throughput repeat {r}: {lib} {res['sps']:,.0f} env steps/s", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"runs": rows, "median": med, "ratio": med["shoal"] / med["sb3"], "target": ">= 3x"}


def part_time_to_solve(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    res: dict[str, list[Any]] = {"shoal": [], "sb3": []}
    for seed in range(1, args.solve_seeds + 1):
        for lib in ("shoal", "sb3"):
            if lib == "shoal":
                r = run_shoal(
                    "CartPole-v1",
                    seed,
                    args.solve_budget,
                    out / f"solve-shoal-{seed}",
                    args.eval_every,
                    THRESHOLD,
                )
            else:
                r = run_sb3("CartPole-v1", seed, args.solve_budget, args.eval_every, THRESHOLD)
            res[lib].append(r["solved_at"])
            print(f"  time-to-solve seed {seed}: {lib} solved at {r['solved_at']}", flush=True)
    med = {}
    for lib, solved in res.items():
        times = [s[1] if s else float("inf") for s in solved]
        med[lib] = statistics.median(times)
    return {"solved_at": res, "median_seconds": med, "ratio": med["shoal"] / med["sb3"], "target": "<= 0.5x"}


def part_curves(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    budgets = {"CartPole-v1": 100_000, "Acrobot-v1": 200_000, "Pendulum-v1": 200_000}
    if args.quick:
        budgets = {k: v // 10 for k, v in budgets.items()}
    results: dict[str, Any] = {}
    for env_id, steps in budgets.items():
        results[env_id] = {"shoal": [], "sb3": [], "budget": steps}
        every = steps // 10
        for seed in range(1, args.seeds + 1):
            s = run_shoal(env_id, seed, steps, out / f"curve-{env_id}-{seed}", every, None, 5)
            b = run_sb3(env_id, seed, steps, every, None, 5)
            results[env_id]["shoal"].append({"final": s["final"], "curve": s["curve"], "wall": s["wall"]})
            results[env_id]["sb3"].append({"final": b["final"], "curve": b["curve"], "wall": b["wall"]})
            print(
                f"  curves {env_id} seed {seed}: final shoal {s['final']:.1f} sb3 {b['final']:.1f}",
                flush=True,
            )
    _plot_curves(results, out.parent / "vs_sb3_curves.png")
    return results


def _plot_curves(results: dict[str, Any], path: Path) -> None:
    panels = {
        f"PPO on {env_id}": {
            lib: [[(steps, value) for steps, _, value in run["curve"]] for run in res[lib]]
            for lib in ("shoal", "sb3")
        }
        for env_id, res in results.items()
    }
    plot_curves(panels, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal bench sb3", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part",
        nargs="+",
        default=["throughput", "time-to-solve"],
        choices=["throughput", "time-to-solve", "curves"],
    )
    parser.add_argument("--repeats", type=int, default=3, help="throughput: alternating runs per library")
    parser.add_argument("--throughput-steps", type=int, default=50_000, help="throughput: env steps per run")
    parser.add_argument("--solve-seeds", type=int, default=3, help="time-to-solve: seeds")
    parser.add_argument("--solve-budget", type=int, default=150_000, help="time-to-solve: max env steps")
    parser.add_argument(
        "--eval-every", type=int, default=5_000, help="time-to-solve: env steps between evals"
    )
    parser.add_argument("--seeds", type=int, default=5, help="curves: seeds per env")
    parser.add_argument("--out", default="benchmarks/results/vs_sb3.json")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, to check the harness")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.throughput_steps, args.solve_seeds, args.seeds = 1, 5_000, 1, 1
    torch.set_num_threads(1)
    out = Path(args.out)
    work = out.parent / "vs_sb3_runs"
    report: dict[str, Any] = {
        "benchmark": "vs_sb3",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("numpy", "gymnasium", "torch", "stable_baselines3"),
        "settings": vars(args),
    }
    if out.exists():  # keep parts measured by earlier invocations
        report = {**json.loads(out.read_text()), **{k: report[k] for k in ("date", "machine", "settings")}}
    parts = {"throughput": part_throughput, "time-to-solve": part_time_to_solve, "curves": part_curves}
    for part in args.part:
        print(f"{part} ...", flush=True)
        report[part] = parts[part](args, work)
    lines = ["| PPO on CartPole-v1 | shoal | SB3 | shoal / SB3 | target |", "|---|---|---|---|---|"]
    if "throughput" in report:
        t = report["throughput"]
        lines.append(
            f"| training env steps/s, 8 envs (median) | {t['median']['shoal']:,.0f} | "
            f"{t['median']['sb3']:,.0f} | **{t['ratio']:.2f}x** | >= 3x |"
        )
    if "time-to-solve" in report:
        t = report["time-to-solve"]
        lines.append(
            f"| wall time to greedy return >= 475, s (median of {len(t['solved_at']['shoal'])} seeds) | "
            f"{t['median_seconds']['shoal']:.1f} | {t['median_seconds']['sb3']:.1f} | "
            f"**{t['ratio']:.2f}x** | <= 0.5x |"
        )
    if "curves" in report:
        lines += [
            "",
            "| PPO, final greedy return (mean over seeds) | budget | shoal | SB3 |",
            "|---|---|---|---|",
        ]
        for env_id, res in report["curves"].items():
            s = np.mean([r["final"] for r in res["shoal"]])
            b = np.mean([r["final"] for r in res["sb3"]])
            lines.append(f"| {env_id} | {res['budget']:,} | {s:.1f} | {b:.1f} |")
    text = "\n".join(lines)
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {out}")
    return 0

"""Env steps/s of vector envs, shoal's against the ones users would otherwise pick.

Every implementation steps the same envs with random actions pre-sampled outside the timed
loop. Within one (env, num_envs) cell all implementations are kept open and timed
round-robin, one window each per repeat, in an order rotated every repeat, so a burst of
machine noise hits them alike; the table reports medians over the repeats. Processes of the other libraries
are created with ``fork``; shoal's with the platform default.

``independent`` is no vector env: ``--workers`` processes each step their share of the envs
for a whole window without ever waiting for one another, which is what the machine's cores
allow any vector env of that many workers (its synchronous ``step`` waits for the slowest
worker at every step). ``shoal-process / independent`` is then the share of that ceiling a
vector env keeps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from shoal.bench import machine
from shoal.envs import ProcessVectorEnv, make_vec  # also registers shoal/HeavyCartPole-v1

IMPLEMENTATIONS = [
    "gym-sync",
    "gym-async",
    "sb3-subproc",
    "envpool",
    "shoal-process",
    "shoal-auto",
    "independent",
]
ENVS = ["CartPole-v1", "shoal/HeavyCartPole-v1"]


def _step_alone(env_id: str, num_envs: int, conn: Any) -> None:
    """An ``independent`` process: on ``(seed, steps)``, step its envs that often, then answer."""
    env = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * num_envs)
    env.reset(seed=0)
    while (job := conn.recv()) is not None:
        seed, steps = job
        actions = np.random.default_rng(seed).integers(0, 2, (steps, num_envs))
        conn.send(None)  # the actions are drawn: the clock may start
        conn.recv()
        for a in actions:
            env.step(a)
        conn.send(None)
    env.close()


class Stepper:
    """One open vector env behind a uniform ``run(actions)``: steps them all, timed.

    ``frames`` counts what one env step is worth in the rate (Atari: its frame skip)."""

    def __init__(self, name: str, env: Any, detail: str = "", frames: int = 1) -> None:
        self.name, self.env, self.detail, self.frames = name, env, detail, frames

    def run(self, actions: np.ndarray) -> float:
        """Step through ``actions`` (steps x envs); return env steps (x ``frames``) per second."""
        step = self.env.step
        start = time.perf_counter()
        for a in actions:
            step(a)
        return self.frames * actions.size / (time.perf_counter() - start)

    def close(self) -> None:
        self.env.close()


class _Independent(Stepper):
    """``workers`` processes stepping their envs side by side, never waiting for each other:
    the ceiling of any vector env on this machine."""

    def __init__(self, env_id: str, num_envs: int, workers: int) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        self.shares = [len(part) for part in np.array_split(np.arange(num_envs), workers) if len(part)]
        self.conns, self.procs = [], []
        for share in self.shares:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_step_alone, args=(env_id, share, theirs), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)
        super().__init__("independent", None, f"{len(self.shares)} processes")

    def run(self, actions: np.ndarray) -> float:
        steps = len(actions)
        for k, conn in enumerate(self.conns):
            conn.send((k, steps))
        for conn in self.conns:
            conn.recv()
        start = time.perf_counter()
        for conn in self.conns:
            conn.send(None)
        for conn in self.conns:
            conn.recv()
        return steps * sum(self.shares) / (time.perf_counter() - start)

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(10)


def open_stepper(
    name: str, env: str | Callable[[], gym.Env], num_envs: int, workers: int, frames: int = 1
) -> Stepper:
    """The implementation ``name`` with ``num_envs`` copies of ``env`` (an id, or a function
    that makes one), reset with seed 0."""
    make_one: Callable[[], gym.Env] = (lambda: gym.make(env)) if isinstance(env, str) else env  # noqa: E731
    detail = ""
    if name == "independent":
        return _Independent(env, num_envs, workers)
    if name == "gym-sync":
        vec = gym.vector.SyncVectorEnv([make_one] * num_envs)
    elif name == "gym-async":
        vec = gym.vector.AsyncVectorEnv([make_one] * num_envs, shared_memory=True, context="fork")
    elif name == "sb3-subproc":
        from stable_baselines3.common.vec_env import SubprocVecEnv

        vec = SubprocVecEnv([make_one] * num_envs, start_method="fork")
    elif name == "envpool":
        import envpool

        vec = envpool.make_gymnasium(env, num_envs=num_envs)
    elif name == "shoal-process":
        vec = ProcessVectorEnv([make_one] * num_envs, num_workers=workers)
        detail = f"{vec.num_workers} workers"
    elif name == "shoal-auto":
        vec = make_vec(env, num_envs, seed=0, num_workers=workers)
        detail = f"auto -> {'process' if isinstance(vec, ProcessVectorEnv) else 'sync'}"
    else:
        raise ValueError(f"unknown implementation {name!r}")
    if name == "sb3-subproc":
        vec.seed(0)
        vec.reset()
    else:
        vec.reset(seed=0)
    return Stepper(name, vec, detail, frames)


def available(name: str, env_id: str) -> str | None:
    """Why ``name`` cannot run ``env_id`` here, or None."""
    if name == "envpool":
        if env_id.startswith("shoal/"):
            return "EnvPool has no such env"
        try:
            import envpool  # noqa: F401
        except ImportError:
            return "envpool not installed"
    if name == "sb3-subproc":
        try:
            import stable_baselines3  # noqa: F401
        except ImportError:
            return "stable-baselines3 not installed"
    return None


def measure_cell(
    env_id: str,
    num_envs: int,
    impls: list[str],
    repeats: int,
    seconds: float,
    workers: int,
    *,
    stepper: Callable[[str, str, int, int], Stepper] | None = None,
    why_not: Callable[[str, str], str | None] | None = None,
    num_actions: int = 2,
    per_step: int = 1,
    warmup: int = 20,
) -> dict[str, dict[str, Any]]:
    """All implementations on one (env, num_envs) cell, round-robin; rates per repeat.

    ``stepper(name, env_id, num_envs, workers)`` opens one (its ``run(actions)`` returns a
    rate of ``per_step`` units per env step: 1 here, 4 frames for Atari), ``why_not`` says
    why one cannot run; actions are drawn from ``range(num_actions)``. Rows come back in
    ``impls`` order, skipped ones too.
    """
    stepper = stepper or open_stepper
    why_not = why_not or available
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, Any]] = {}
    steppers: dict[str, Stepper] = {}
    try:
        for name in impls:
            why = why_not(name, env_id)
            if why:
                results[name] = {"skipped": why}
                continue
            steppers[name] = stepper(name, env_id, num_envs, workers)
        # Size the windows from a warm-up so that each takes about `seconds`.
        lengths = {}
        for name, s in steppers.items():
            rate = s.run(rng.integers(0, num_actions, (warmup, num_envs)))
            lengths[name] = max(5, int(rate / per_step * seconds / num_envs))
        runs: dict[str, list[float]] = {name: [] for name in steppers}
        order = list(steppers)
        for r in range(repeats):
            # Rotate the order each repeat and pause between windows, so that whatever one
            # implementation leaves behind (threads winding down, cold caches) hits all alike.
            for name in order[r % len(order) :] + order[: r % len(order)]:
                actions = rng.integers(0, num_actions, (lengths[name], num_envs))
                time.sleep(0.1)
                runs[name].append(steppers[name].run(actions))
        for name, rates in runs.items():
            results[name] = {
                "median": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                "runs": rates,
                "detail": steppers[name].detail,
            }
    finally:
        for s in steppers.values():
            s.close()
    return {name: results[name] for name in impls}


def _fmt(cell: dict[str, Any]) -> str:
    if "median" not in cell:
        return "n/a"
    v = cell["median"]
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def table(results: dict[str, Any], envs: list[str], sizes: list[int], impls: list[str]) -> str:
    """Markdown table of medians: one row per implementation, one column per cell."""
    cols = [(e, n) for e in envs for n in sizes]
    head = "| steps/s (median) | " + " | ".join(f"{e.split('/')[-1]} x{n}" for e, n in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for name in impls:
        cells = [_fmt(results[e][str(n)].get(name, {})) for e, n in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: dict[str, Any]) -> list[tuple[str, float | None, float]]:
    """The claims the README makes, as (what, measured ratio, target)."""

    def ratio(env: str, n: int, a: str, b: str) -> float | None:
        cell = results.get(env, {}).get(str(n), {})
        if "median" in cell.get(a, {}) and "median" in cell.get(b, {}):
            return cell[a]["median"] / cell[b]["median"]
        return None

    return [
        (
            "shoal-process / gym-async, CartPole x32",
            ratio("CartPole-v1", 32, "shoal-process", "gym-async"),
            8.0,
        ),
        (
            "shoal-process / gym-sync, CartPole x32",
            ratio("CartPole-v1", 32, "shoal-process", "gym-sync"),
            1.2,
        ),
        (
            "shoal-process / gym-sync, HeavyCartPole x8",
            ratio("shoal/HeavyCartPole-v1", 8, "shoal-process", "gym-sync"),
            1.8,
        ),
    ]


KEY = "shoal-process"


def ceilings(results: dict[str, Any]) -> list[tuple[str, float]]:
    """What the cores allow (independent / gym-sync) and the share of it shoal keeps, per cell."""
    out = []
    for env, cells in results.items():
        for n, cell in cells.items():
            alone, sync, ours = (cell.get(k, {}).get("median") for k in ("independent", "gym-sync", KEY))
            name = f"{env.split('/')[-1]} x{n}"
            if alone and sync:
                out.append((f"independent / gym-sync, {name} (the ceiling)", alone / sync))
            if alone and ours:
                out.append((f"shoal-process / independent, {name}", ours / alone))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shoal bench envs", description=__doc__.split("\n")[0])
    parser.add_argument("--envs", nargs="+", default=ENVS, help="env ids")
    parser.add_argument("--num-envs", nargs="+", type=int, default=[8, 32, 128], help="vector sizes")
    parser.add_argument("--impls", nargs="+", default=IMPLEMENTATIONS, choices=IMPLEMENTATIONS)
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per implementation")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed window")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shoal env workers")
    parser.add_argument("--out", default="benchmarks/results/vector_envs.json", help="JSON output")
    parser.add_argument("--quick", action="store_true", help="8 and 32 envs, 3 short repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_envs, args.repeats, args.seconds = [n for n in args.num_envs if n <= 32], 3, 0.2
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for env_id in args.envs:
        results[env_id] = {}
        for n in args.num_envs:
            print(f"measuring {env_id} x{n} ...", flush=True)
            results[env_id][str(n)] = measure_cell(
                env_id, n, args.impls, args.repeats, args.seconds, args.workers
            )
    md = table(results, args.envs, args.num_envs, args.impls)
    claims = ratios(results)
    lines = [md, ""]
    for what, value, target in claims:
        if value is not None:
            verdict = "ok" if value >= target else "BELOW TARGET"
            lines.append(f"- {what}: **{value:.2f}x** (target >= {target}x, {verdict})")
    for what, value in ceilings(results):
        lines.append(f"- {what}: {value:.2f}x")
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    report = {
        "benchmark": "vector_envs",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("numpy", "gymnasium", "torch", "envpool", "stable_baselines3"),
        "settings": {k: v for k, v in vars(args).items()},
        "results": results,
        "ratios": [{"what": w, "ratio": v, "target": t} for w, v, t in claims],
        "ceilings": [{"what": w, "ratio": v} for w, v in ceilings(results)],
        "seconds": time.perf_counter() - started,
    }
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')} in {report['seconds']:.0f} s")
    return 0

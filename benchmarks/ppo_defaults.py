"""shoal's PPO defaults vs SB3's, side by side: ``python benchmarks/ppo_defaults.py``.

Each library trains with nothing but the env id (and the seed and budget): shoal with
``shoal.PPO(env, seed=S, total_steps=N)`` (no preset unless the env has one), SB3 with
``PPO("MlpPolicy", env, seed=S)``. Both are evaluated greedily on the same 20 episode seeds
(shoal's evaluation seeds). ``--shoal KEY=VALUE`` overrides one of shoal's settings (to
compare variants of the defaults); ``--skip-sb3`` runs shoal alone.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import shoal
from shoal.agent import make_config


def run_shoal(env: str, seed: int, steps: int, overrides: dict, run_dir: str) -> dict:
    start = time.perf_counter()
    config = make_config("ppo", env, {"seed": seed, "total_steps": steps, "run_dir": run_dir, **overrides})
    agent = shoal.Agent("ppo", env, config=config).learn(progress=False)
    return {"mean_return": agent.summary["mean_return"], "seconds": time.perf_counter() - start}


def run_sb3(env: str, seed: int, steps: int) -> dict:
    import torch
    from stable_baselines3 import PPO

    from shoal.bench.sb3 import _greedy_sb3

    torch.set_num_threads(1)
    start = time.perf_counter()
    model = PPO("MlpPolicy", env, seed=seed, device="cpu")
    model.learn(steps)
    seconds = time.perf_counter() - start
    return {"mean_return": _greedy_sb3(model, env, 20, seed), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="LunarLander-v3")
    parser.add_argument("--steps", type=int, default=300_000)
    parser.add_argument("--seeds", default="1", help="comma-separated")
    parser.add_argument("--shoal", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-sb3", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.shoal)}
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(
                {"library": "shoal", "seed": seed, **run_shoal(args.env, seed, args.steps, overrides, tmp)}
            )
        if not args.skip_sb3:
            rows.append({"library": "sb3", "seed": seed, **run_sb3(args.env, seed, args.steps)})
    print(
        f"| PPO defaults, {args.env}, {args.steps:,} steps | seed | greedy return (20 episodes) | train s |"
    )
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['library']} | {r['seed']} | {r['mean_return']:.1f} | {r['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"env": args.env, "steps": args.steps, "shoal_overrides": overrides, "rows": rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

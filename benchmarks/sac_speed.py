"""SAC training env steps/s, shoal vs Stable-Baselines3, identical hyperparameters.

``python benchmarks/sac_speed.py --env HalfCheetah-v5 --steps 3000 --repeats 3``

Both train one env on the CPU with the same torch thread count and SB3's SAC defaults
(256x256 networks, batch 256, lr 3e-4, buffer 1e6, tau 0.005, one gradient step per env
step, automatic entropy tuning). The clock starts when learning starts (after
``learning_starts`` random steps) and stops after ``--steps`` more env steps; the two
libraries alternate, and the medians and their ratio are printed (and written as JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shoal.agent import make_config
from shoal.algos import SAC
from shoal.bench.zoo import OFF_POLICY
from shoal.training.trainer import Trainer

SETTINGS: dict[str, Any] = OFF_POLICY["sac"]  # SB3's SAC defaults, as `shoal bench zoo` runs them


def shoal_sps(env_id: str, steps: int, seed: int, threads: int) -> float:
    run_dir = Path(tempfile.mkdtemp(prefix="sac-speed-"))
    start = SETTINGS["learning_starts"]
    config = make_config(
        "sac",
        env_id,
        {
            **SETTINGS,
            "seed": seed,
            "total_steps": start + steps,
            "run_dir": str(run_dir / "run"),
            "eval_episodes": 1,
            "checkpoint_every": 10**9,  # no checkpoint inside the timed span
            "torch_threads": threads,
            "vectorization": "sync",
        },
        presets=False,
    )
    trainer = Trainer(SAC, config, progress=False)
    marks: dict[str, float] = {}

    def on_update(t: Trainer) -> bool:
        if t.env_steps >= start and "begin" not in marks:
            marks["begin"], marks["from"] = time.perf_counter(), t.env_steps
        if t.env_steps >= start + steps:
            marks["end"], marks["to"] = time.perf_counter(), t.env_steps
        return False

    trainer.train(on_update=on_update)
    shutil.rmtree(run_dir, ignore_errors=True)
    return (marks["to"] - marks["from"]) / (marks["end"] - marks["begin"])


def sb3_sps(env_id: str, steps: int, seed: int, threads: int) -> float:
    from stable_baselines3 import SAC as SB3SAC
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(threads)
    start = SETTINGS["learning_starts"]

    class Clock(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.marks: dict[str, float] = {}

        def _on_step(self) -> bool:
            # called after each env step; the first gradient step follows step `start`
            if self.num_timesteps == start + 1:
                self.marks["begin"] = time.perf_counter()
            if self.num_timesteps == start + 1 + steps:
                self.marks["end"] = time.perf_counter()
            return True

    model = SB3SAC(
        "MlpPolicy",
        env_id,
        learning_rate=SETTINGS["learning_rate"],
        buffer_size=SETTINGS["buffer_size"],
        learning_starts=start,
        batch_size=SETTINGS["batch_size"],
        tau=SETTINGS["tau"],
        gamma=SETTINGS["gamma"],
        train_freq=SETTINGS["train_freq"],
        gradient_steps=SETTINGS["gradient_steps"],
        policy_kwargs={"net_arch": list(SETTINGS["hidden"])},
        seed=seed,
        device="cpu",
    )
    clock = Clock()
    model.learn(start + steps + 1, callback=clock)
    return steps / (clock.marks["end"] - clock.marks["begin"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--steps", type=int, default=3000, help="timed env steps after learning starts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both")
    p.add_argument("--out", default="benchmarks/results/sac_speed.json")
    a = p.parse_args(argv)
    results: dict[str, list[float]] = {"shoal": [], "sb3": []}
    for r in range(a.repeats):
        results["sb3"].append(sb3_sps(a.env, a.steps, seed=r, threads=a.threads))
        results["shoal"].append(shoal_sps(a.env, a.steps, seed=r, threads=a.threads))
        print(f"repeat {r}: sb3 {results['sb3'][-1]:.1f}, shoal {results['shoal'][-1]:.1f} env steps/s")
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["shoal"] / med["sb3"]
    print(f"{a.env}: median env steps/s shoal {med['shoal']:.1f}, sb3 {med['sb3']:.1f}, ratio {ratio:.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**vars(a), "runs": results, "median": med, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

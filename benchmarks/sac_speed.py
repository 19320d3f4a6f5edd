"""SAC training env steps/s, shoal vs Stable-Baselines3, identical hyperparameters.

``python benchmarks/sac_speed.py --env HalfCheetah-v5 --steps 3000 --repeats 3``

Both train one env on the CPU with the same torch thread count and SB3's SAC defaults
(256x256 networks, batch 256, lr 3e-4, buffer 1e6, tau 0.005, one gradient step per env
step, automatic entropy tuning). The clock starts when learning starts (after
``learning_starts`` random steps) and stops after ``--steps`` more env steps; the two
libraries alternate, and the medians and their ratio are printed (and written as JSON).

``--floor`` adds what bounds the ratio: the matrix-product FLOPs of one of shoal's SAC
gradient steps (counted by torch's FlopCounterMode), how long those products take inside
the step (torch's profiler), how long they would take at the rate of one plain 256x256x256
product on this machine, against the time per env step that 2x SB3 allows.
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

import numpy as np
import torch

from shoal.bench import gemm_rate
from shoal.bench.zoo import OFF_POLICY, make_config, sb3_off_policy_sps, shoal_off_policy_sps

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def update_floor(env_id: str, threads: int, updates: int = 200) -> dict[str, Any]:
    """One of shoal's SAC gradient steps on ``env_id`` (SB3's defaults), on a replay of
    random transitions: its wall time, its matrix-product FLOPs and the time they take."""
    import gymnasium as gym
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    from shoal.algos import ALGORITHMS

    torch.set_num_threads(threads)
    overrides = {**OFF_POLICY["sac"], "seed": 1, "total_steps": 10**6, "torch_threads": threads}
    config = make_config("sac", env_id, overrides, presets=False)
    env = gym.make(env_id)
    sac = ALGORITHMS["sac"](config, env.observation_space, env.action_space, torch.device("cpu"))
    rng, shape = np.random.default_rng(0), (1, *env.observation_space.shape)
    filled, no = 10 * config.batch_size, np.zeros(1, dtype=bool)
    for step in range(1, filled + 1):
        sac.act(rng.standard_normal(shape).astype(np.float32))
        next_obs = rng.standard_normal(shape).astype(np.float32)
        sac.record(rng.standard_normal(1).astype(np.float32), no, no, next_obs, ~no, step)
    clock = [filled]

    def one() -> None:
        clock[0] += 1
        sac.env_steps = clock[0]
        sac.update(None, clock[0])

    for _ in range(20):
        one()
    with FlopCounterMode(display=False) as counter:
        one()
    start = time.perf_counter()
    for _ in range(updates):
        one()
    wall = (time.perf_counter() - start) / updates
    with profile() as prof:
        for _ in range(updates // 4):
            one()
    products = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS)
    env.close()
    return {
        "update_ms": 1e3 * wall,
        "matmul_gflop": counter.get_total_flops() / 1e9,
        "matmul_ms": products / 1e3 / (updates // 4),  # profiler times are in microseconds
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--steps", type=int, default=3000, help="timed env steps after learning starts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both")
    p.add_argument("--out", default="benchmarks/results/sac_speed.json")
    p.add_argument("--floor", action="store_true", help="also measure what bounds the ratio (above)")
    a = p.parse_args(argv)
    results: dict[str, list[float]] = {"shoal": [], "sb3": []}
    work = Path(tempfile.mkdtemp(prefix="sac-speed-"))
    for r in range(a.repeats):  # the same measurement as `shoal bench zoo --part offpolicy --rows speed`
        results["sb3"].append(sb3_off_policy_sps("sac", a.env, r, a.steps, threads=a.threads))
        results["shoal"].append(shoal_off_policy_sps("sac", a.env, r, a.steps, work, threads=a.threads))
        print(f"repeat {r}: sb3 {results['sb3'][-1]:.1f}, shoal {results['shoal'][-1]:.1f} env steps/s")
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["shoal"] / med["sb3"]
    print(f"{a.env}: median env steps/s shoal {med['shoal']:.1f}, sb3 {med['sb3']:.1f}, ratio {ratio:.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    report: dict[str, Any] = {**vars(a), "runs": results, "median": med, "ratio": ratio}
    if a.floor:
        floor = update_floor(a.env, a.threads)
        floor["gemm_gflops"] = rate = gemm_rate(a.threads)
        floor["matmul_ms_at_gemm_rate"] = 1e3 * floor["matmul_gflop"] / rate
        floor["budget_ms_for_2x"] = budget = 1e3 / (2 * med["sb3"])
        report["floor"] = floor
        print(
            f"2x SB3 allows {budget:.1f} ms per env step. One shoal SAC gradient step takes"
            f" {floor['update_ms']:.1f} ms, of which matrix products {floor['matmul_ms']:.1f} ms:"
            f" {floor['matmul_gflop']:.3f} GFLOP, {floor['matmul_ms_at_gemm_rate']:.1f} ms at this"
            f" machine's {rate:.0f} GFLOP/s for a plain 256x256x256 product ({a.threads} thread(s))"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

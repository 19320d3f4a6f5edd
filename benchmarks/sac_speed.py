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
from pathlib import Path

from shoal.bench.zoo import sb3_off_policy_sps, shoal_off_policy_sps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="HalfCheetah-v5")
    p.add_argument("--steps", type=int, default=3000, help="timed env steps after learning starts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both")
    p.add_argument("--out", default="benchmarks/results/sac_speed.json")
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
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**vars(a), "runs": results, "median": med, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

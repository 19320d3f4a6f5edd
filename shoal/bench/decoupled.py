"""``shoal bench scaling --part decoupled``: actors and a learner against taking turns.

On one env (shoal/HeavyCartPole-v1 by default: ~200 us of CPU per step, so stepping is the
work), side by side in one run, rotated every repeat so that a burst of machine noise hits
all alike:

- ``raw``: what ``ProcessVectorEnv`` steps with random actions, for the envs of all actors
  (``actors x num_envs`` envs on ``actors`` env workers);
- ``one core``: what gymnasium's ``SyncVectorEnv`` steps with random actions, the same envs
  in one process, measured right after each SB3 run (this machine's speed drifts by 1.5x
  over minutes, so only the minutes next to SB3's can bound it). Twice that is what two
  cores could step if they did nothing else, so ``2 x one core / sb3 ppo`` bounds what any
  training on 2 cores can reach over SB3 (printed as the ceiling of the ``sb3 ppo`` target);
- ``appo`` and ``impala`` with 1 and 2 actors (``num_envs`` envs each, their defaults
  otherwise): training env steps/s received by the learner, what the actors produced, the
  share of time the learner spent learning, the policy lag and drops;
- ``ppo sync`` with 2 ``mp`` workers (``num_envs`` each, PPO's defaults): the step-by-step
  loop, each worker taking turns between acting and learning;
- ``sb3 ppo``: Stable-Baselines3's PPO with the same PPO hyperparameters on all the envs in
  one process (its ``DummyVecEnv`` default), what a user would otherwise run.

Training env steps/s are taken between the first and the last metrics row of a run, so
process start-up and the final evaluation are not counted (SB3's: its ``learn`` call).

Then, on CartPole-v1, the wall time until the greedy return (10 episodes, evaluated every
``--solve-every`` env steps with the clock paused) first reaches 475: ``appo`` with its
defaults (2 actors, its CartPole preset) against SB3's PPO with RL-Zoo's CartPole
hyperparameters, ``--solve-seeds`` seeds each, medians. APPO's actors keep acting while
the learner evaluates (at most their slots' worth of trajectories), SB3 stands still.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = {"raw": 0.8, "ppo sync x2": 1.6, "sb3 ppo": 3.0}  # appo x2 over each, on 2 cores
SOLVE_TARGET = 0.25  # appo's median time to 475 over SB3's (RL-Zoo hyperparameters)

# RL-Baselines3-Zoo's hyperparams/ppo.yml, CartPole-v1 entry (100k steps; "lin_" values decay
# linearly to 0), with SB3's defaults for what it leaves out.
RL_ZOO_CARTPOLE: dict[str, Any] = dict(
    normalize=False,
    n_envs=8,
    n_steps=32,
    batch_size=256,
    gae_lambda=0.8,
    gamma=0.98,
    n_epochs=20,
    ent_coef=0.0,
    learning_rate=lambda progress: progress * 1e-3,  # lin_1e-3 (progress runs from 1 to 0)
    clip_range=lambda progress: progress * 0.2,  # lin_0.2
    max_grad_norm=0.5,
    vf_coef=0.5,
    log_std_init=0.0,
    ortho_init=True,
    activation_fn="Tanh",
    net_arch={"pi": [64, 64], "vf": [64, 64]},
)


def run_decoupled(work: Path, algo: str, env: str, actors: int, steps_per_actor: int, num_envs: int) -> dict:
    """One ``shoal train impala|appo`` run; its throughput numbers from ``metrics.jsonl``."""
    from shoal.agent import make_config
    from shoal.configio import validate
    from shoal.launch import train

    total = steps_per_actor * actors
    run_dir = Path(tempfile.mkdtemp(prefix=f"{algo}-", dir=work))
    settings = dict(
        num_actors=actors,
        num_envs=num_envs,
        total_steps=total,
        eval_episodes=1,
        log_every=max(1, total // 10),
        checkpoint_every=total,
        seed=1,
        run_dir=str(run_dir),
    )
    config = make_config(algo, env, settings)
    validate(config)
    started = time.perf_counter()
    summary, _ = train(algo, config, progress=False)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    first, last = rows[0], rows[-1]
    timed = rows[1:] or rows
    span = max(last["wall_time"] - first["wall_time"], 1e-9)
    return {
        "sps": (last["env_steps"] - first["env_steps"]) / span if len(rows) > 1 else last["sps"],
        "actor_sps": statistics.fmean(r["actor_sps"] for r in timed),
        "learner_busy": statistics.fmean(r["learner_busy"] for r in timed),
        "queue_fill": statistics.fmean(r["queue_fill"] for r in timed),
        "policy_lag": statistics.fmean(r.get("policy_lag", 0.0) for r in timed),
        "policy_lag_max": max(r.get("policy_lag_max", 0.0) for r in timed),
        "dropped": summary["trajectories_dropped_stale"],
        "consistent": summary["trajectories_consistent"],
        "run_seconds": seconds,
        "settings": {k: v for k, v in settings.items() if k != "run_dir"},
    }


def run_sb3_ppo(env: str, num_envs: int, steps: int) -> dict:
    """SB3's PPO with shoal's PPO defaults for ``env``, argument for argument; its steps/s."""
    import shoal.envs  # noqa: F401  (registers shoal/HeavyCartPole-v1 for gym.make)
    from shoal.bench.sb3 import sb3_ppo, shoal_config

    config = shoal_config(env, 1, "/dev/null", num_envs=num_envs, total_steps=steps)
    model = sb3_ppo(env, config, seed=1)
    started = time.perf_counter()
    model.learn(total_timesteps=steps)
    seconds = time.perf_counter() - started
    model.get_env().close()
    return {"sps": model.num_timesteps / seconds, "run_seconds": seconds, "num_steps": config.num_steps}


def run_sb3_then_one_core(env: str, num_envs: int, steps: int) -> dict:
    """SB3's row, and the one-core row right after it, in the same minutes of machine speed."""
    res = run_sb3_ppo(env, num_envs, steps)
    res["one_core"] = run_raw(env, num_envs, 1, impl="gym-sync")["sps"]
    return res


def run_raw(env: str, num_envs: int, workers: int, impl: str = "shoal-process") -> dict:
    from shoal.bench.vector_envs import measure_cell

    cell = measure_cell(env, num_envs, [impl], repeats=3, seconds=2.0, workers=workers)
    return {"sps": cell[impl]["median"], "runs": cell[impl]["runs"]}


def part_decoupled(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every row of the module docstring, ``args.decoupled_repeats`` times, order rotated."""
    from shoal.bench.scaling import run_one

    env, n, steps = args.decoupled_env, args.actor_envs, args.actor_steps
    cells: dict[str, Any] = {
        "raw": lambda: run_raw(env, 2 * n, 2),
        "appo x1": lambda: run_decoupled(work, "appo", env, 1, steps, n),
        "appo x2": lambda: run_decoupled(work, "appo", env, 2, steps, n),
        "impala x1": lambda: run_decoupled(work, "impala", env, 1, steps, n),
        "impala x2": lambda: run_decoupled(work, "impala", env, 2, steps, n),
        "ppo sync x2": lambda: run_one(work, "ppo", env, "mp", "sync", 2, steps, num_envs=n),
        "sb3 ppo": lambda: run_sb3_then_one_core(env, 2 * n, args.sb3_steps),
    }
    names = [c for c in cells if not (c == "sb3 ppo" and not _have_sb3())]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in names}
    for r in range(args.decoupled_repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            res = cells[name]()
            res.pop("config", None)
            runs[name].append(res)
            print(f"  {env} {name} (repeat {r}): {res['sps']:,.0f} env steps/s", flush=True)
            if "one_core" in res:
                print(f"  {env} one core (repeat {r}): {res['one_core']:,.0f} env steps/s", flush=True)
    if "sb3 ppo" in runs:  # the one-core row, after raw
        one_core = [{"sps": r.pop("one_core")} for r in runs["sb3 ppo"]]
        order = list(runs)
        order.insert(order.index("raw") + 1, "one core")
        runs = {name: one_core if name == "one core" else runs[name] for name in order}
    rows = {}
    for name, rs in runs.items():
        row: dict[str, Any] = {"sps": statistics.median(x["sps"] for x in rs), "runs": rs}
        for key in ("actor_sps", "learner_busy", "queue_fill", "policy_lag"):
            if key in rs[0]:
                row[key] = statistics.median(x[key] for x in rs)
        if "policy_lag_max" in rs[0]:
            row["policy_lag_max"] = max(x["policy_lag_max"] for x in rs)
            row["dropped"] = sum(x["dropped"] for x in rs)
            row["consistent"] = all(x["consistent"] for x in rs)
        rows[name] = row
    appo = runs.get("appo x2", [])
    ratios = {}
    for other in TARGETS:
        if other in runs and appo:
            paired = [a["sps"] / b["sps"] for a, b in zip(appo, runs[other])]
            ratios[other] = {
                "ratio": rows["appo x2"]["sps"] / rows[other]["sps"],
                "paired": paired,
                "target": TARGETS[other],
            }
    ceiling = {}
    if "one core" in runs and "sb3 ppo" in runs:  # no training on 2 cores steps more than 2 x one core
        paired = [2 * a["sps"] / b["sps"] for a, b in zip(runs["one core"], runs["sb3 ppo"])]
        ceiling["sb3 ppo"] = {"ratio": 2 * rows["one core"]["sps"] / rows["sb3 ppo"]["sps"], "paired": paired}
    solve = part_solve_time(args, work) if args.solve_seeds_decoupled else {}
    return {
        "ceiling_over": ceiling,
        "solve": solve,
        "env": env,
        "actor_envs": n,
        "actor_steps": steps,
        "sb3_steps": args.sb3_steps,
        "repeats": args.decoupled_repeats,
        "rows": rows,
        "appo_x2_over": ratios,
    }


def part_solve_time(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Wall time to a greedy 475 on CartPole-v1: appo's defaults vs SB3's PPO (RL-Zoo).

    ``--solve-repeats`` runs every seed that many times: SB3 solves a seed at the same step
    in every run, APPO does not (which trajectory reaches its learner first is up to the OS
    scheduler), so one run's median of 5 seeds moves by up to 2x between runs. The claim
    is then the ratio of the medians over all runs; each repeat's own ratio is kept too.
    """
    from shoal.agent import make_config
    from shoal.algos import APPO
    from shoal.bench.sb3 import THRESHOLD, run_sb3, run_shoal
    from shoal.training.decoupled import DecoupledTrainer

    env, budget = "CartPole-v1", args.solve_budget
    runs: dict[str, list[dict[str, Any]]] = {"appo": [], "sb3 ppo rl-zoo": []}
    for repeat in range(args.solve_repeats):
        for seed in args.solve_seeds_decoupled:
            for side in list(runs) if (seed + repeat) % 2 else list(runs)[::-1]:  # alternate the first
                if side == "appo":
                    run_dir = Path(tempfile.mkdtemp(prefix="appo-solve-", dir=work))
                    config = make_config(
                        "appo", env, dict(seed=seed, total_steps=budget, run_dir=str(run_dir))
                    )
                    trainer = DecoupledTrainer(APPO, config, progress=False)
                    res = run_shoal(env, seed, budget, run_dir, args.solve_every, THRESHOLD, trainer=trainer)
                else:
                    if not _have_sb3():
                        continue
                    model = _sb3_rl_zoo_cartpole(seed)
                    res = run_sb3(env, seed, budget, args.solve_every, THRESHOLD, model=model)
                res.pop("curve", None)
                runs[side].append({"seed": seed, "repeat": repeat, **res})
                at = res["solved_at"]
                when = f"475 at {at[0]:,} steps, {at[1]:.1f} s" if at else "not solved"
                print(f"  {env} {side} seed {seed} (repeat {repeat}): {when}", flush=True)
    out: dict[str, Any] = {
        "env": env,
        "budget": budget,
        "every": args.solve_every,
        "repeats": args.solve_repeats,
        "runs": runs,
        "median_seconds": {side: _median_time(rs) for side, rs in runs.items()},
    }
    mine, theirs = out["median_seconds"]["appo"], out["median_seconds"]["sb3 ppo rl-zoo"]
    if mine is not None and theirs and not math.isinf(theirs):  # (inf: appo never solved: inf)
        out["ratio"] = mine / theirs

        def median_of(side: str, k: int) -> float | None:
            return _median_time([r for r in runs[side] if r["repeat"] == k])

        out["repeat_ratios"] = [
            median_of("appo", k) / median_of("sb3 ppo rl-zoo", k) for k in range(args.solve_repeats)
        ]
    return out


def _median_time(runs: list[dict[str, Any]]) -> float | None:
    """The median seconds to 475; a run that never got there counts as never (inf)."""
    solved = [r["solved_at"][1] if r["solved_at"] else math.inf for r in runs]
    return statistics.median(solved) if solved else None


def _sb3_rl_zoo_cartpole(seed: int) -> Any:
    from shoal.bench.zoo import sb3_ppo_rl_zoo

    return sb3_ppo_rl_zoo("CartPole-v1", seed, RL_ZOO_CARTPOLE)[0]


def _have_sb3() -> bool:
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        return False
    return True


def table(part: dict[str, Any]) -> list[str]:
    env = part["env"].split("/")[-1]
    out = [
        f"Decoupled actors vs taking turns, {env}, {part['actor_envs']} envs per actor or worker"
        f" (median of {part['repeats']} runs)",
        "",
        "| row | env steps/s | actors' steps/s | learner busy | queue fill | lag mean / max | dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in part["rows"].items():
        lag = f"{row['policy_lag']:.1f} / {row['policy_lag_max']:.0f}" if "policy_lag_max" in row else "-"
        out.append(
            f"| {name} | {row['sps']:,.0f} | "
            + (f"{row['actor_sps']:,.0f}" if "actor_sps" in row else "-")
            + " | "
            + (f"{100 * row['learner_busy']:.0f}%" if "learner_busy" in row else "-")
            + " | "
            + (f"{100 * row['queue_fill']:.0f}%" if "queue_fill" in row else "-")
            + f" | {lag} | {row.get('dropped', '-')} |"
        )
    for other, c in part.get("ceiling_over", {}).items():
        out += [
            "",
            f"Ceiling over {other}: 2 x one core / {other} = {c['ratio']:.2f}x"
            f" ({', '.join(f'{p:.2f}' for p in c['paired'])} paired): the most any training on"
            " 2 cores reaches over it, with no cost for acting or learning",
        ]
    out.append("")
    if part.get("solve"):
        out += solve_table(part["solve"])
    return out


def solve_table(part: dict[str, Any]) -> list[str]:
    repeats = part.get("repeats", 1)
    out = [
        f"Wall time to a greedy return >= 475 on {part['env']} (evaluated every {part['every']:,} steps,"
        " clock paused)" + (f", every seed run {repeats} times" if repeats > 1 else ""),
        "",
        "| side | runs | solved | median s | per run (s, steps) |",
        "|---|---|---|---|---|",
    ]
    for side, rs in part["runs"].items():
        if not rs:
            continue
        cells = ", ".join(
            f"{r['solved_at'][1]:.1f} s @ {r['solved_at'][0] // 1000}k" if r["solved_at"] else "not solved"
            for r in rs
        )
        med = part["median_seconds"][side]
        out.append(
            f"| {side} | {len(rs)} | {sum(bool(r['solved_at']) for r in rs)} | "
            f"{'never' if med is None or math.isinf(med) else f'{med:.1f}'} | {cells} |"
        )
    if len(part.get("repeat_ratios", [])) > 1:
        out += [
            "",
            "appo / sb3 per repeat (medians of its seeds): "
            + ", ".join(f"{x:.2f}x" for x in part["repeat_ratios"]),
        ]
    out.append("")
    return out


def claims(part: dict[str, Any]) -> list[dict[str, Any]]:
    env = part["env"].split("/")[-1]
    return [
        {
            "what": f"{env}: appo, 2 actors, env steps/s over {other}"
            f" ({', '.join(f'{p:.2f}' for p in r['paired'])} paired)",
            "value": r["ratio"],
            "target": r["target"],
            "unit": "x",
        }
        for other, r in part.get("appo_x2_over", {}).items()
    ] + solve_claims(part.get("solve", {}))


def solve_claims(solve: dict[str, Any]) -> list[dict[str, Any]]:
    if "ratio" not in solve:
        return []
    runs = len(solve["runs"]["appo"])
    repeats = solve.get("repeat_ratios", [])
    each = f" (per repeat: {', '.join(f'{x:.2f}' for x in repeats)})" if len(repeats) > 1 else ""
    return [
        {
            "what": f"CartPole-v1: appo's median wall time to 475 over SB3 PPO's (RL-Zoo), {runs} runs{each}",
            "value": solve["ratio"],
            "target": SOLVE_TARGET,
            "unit": "x",
            "lower": True,
        }
    ]

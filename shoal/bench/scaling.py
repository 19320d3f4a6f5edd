"""How shoal's distributed training scales with workers, and what gradient compression saves.

Parts (``--part``):
- ``throughput``: training env steps/s and time per update of every strategy on every
  backend with 1 and 2 workers (more where cores allow), on CartPole-v1 (a ~5 us step,
  so updates and communication dominate) and shoal/HeavyCartPole-v1 (~200 us of real CPU
  work per step, so env stepping dominates). Each worker runs the same number of env
  steps whatever the worker count, so every run's timed part lasts about as long.
- ``bytes``: bytes each worker sends per optimizer step on CartPole-v1 with 2 ``mp``
  workers, for every strategy, uncompressed and with ``fp16`` and ``topk`` compression.
- ``decoupled``: IMPALA and APPO with 1 and 2 actors against the raw stepping rate of the
  same envs, PPO ``sync`` with 2 workers and SB3's PPO (:mod:`shoal.bench.decoupled`).
- ``solve``: whether PPO with ``sync`` and top-k 1% compression (2 ``mp`` workers x 4 envs,
  CartPole-v1, shoal's defaults otherwise) still solves CartPole, next to the same run
  uncompressed.

Every run is a real ``shoal.launch.train`` call: processes (or Ray actors) started, a
torch.distributed group joined, the parameter server started where the strategy has one.
The numbers come from the chief's ``metrics.jsonl``: env steps/s is the last row's ``sps``
(summed over workers, each from its own loop start, so start-up is not counted), time per
update the mean of the rows' ``update_seconds``. Every training worker steps its envs in
its own process (``vectorization=sync``): one worker, one core.

The key rows (the heavy env on ``mp``, ``sync`` and ``a3c``) run ``--repeats`` times, the
worker counts alternating in an order rotated every repeat, so that a burst of machine
noise hits them alike; the table reports medians, the JSON every run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shoal.bench import decoupled, machine

HEAVY = "shoal/HeavyCartPole-v1"
ENVS = ["CartPole-v1", HEAVY]
BACKENDS = ["mp", "ray"]
# A cell is a strategy, trained with --algo unless it names its own algorithm: "a3c:a2c" is
# A3C as published (the actor-critic update, one push per rollout); plain "a3c" with PPO is
# asynchronous PPO (one push per minibatch step: 16 per update with PPO's defaults).
STRATEGIES = ["sync", "a3c", "a3c:a2c", "param-avg", "param-server"]
COMPRESS = ["none", "fp16", "topk"]
# The rows the scaling targets are about (heavy env, mp), repeated --repeats times.
KEY_ROWS = [(HEAVY, "mp", "sync"), (HEAVY, "mp", "a3c:a2c"), (HEAVY, "mp", "a3c")]
SOLVED = 475.0
SCALING_TARGET = 1.7
BYTES_TARGET = 20.0

# Env steps each worker runs in one throughput run: a few seconds at ~5k (heavy) and ~10k
# (CartPole) training steps/s per worker.
STEPS_PER_WORKER = {"CartPole-v1": 25_000, HEAVY: 12_000}


def cell_algo(strategy: str, default: str) -> tuple[str, str]:
    """("a3c", "a2c") for "a3c:a2c"; (strategy, default) for a plain strategy."""
    name, _, algo = strategy.partition(":")
    return name, algo or default


def default_workers() -> list[int]:
    """1, 2, 4, ... up to the core count (at least 1 and 2)."""
    counts, n = [1, 2], 4
    while n <= (os.cpu_count() or 1):
        counts.append(n)
        n *= 2
    return counts


# -- one training run -------------------------------------------------------------------------
def run_one(
    work: Path,
    algo: str,
    env: str,
    backend: str,
    strategy: str,
    workers: int,
    steps_per_worker: int,
    **overrides: Any,
) -> dict[str, Any]:
    """Train once with ``shoal.launch.train``; the numbers the tables need from its metrics."""
    from shoal.agent import make_config
    from shoal.configio import validate
    from shoal.launch import train
    from shoal.training.trainer import config_dict

    total = steps_per_worker * workers
    settings: dict[str, Any] = dict(
        backend=backend,
        strategy=strategy,
        num_workers=workers,
        total_steps=total,
        vectorization="sync",
        eval_episodes=1,
        log_every=max(1, total // 10),
        checkpoint_every=total,  # no checkpoint (and env reset) in the middle of the timed part
        compress="none",
        seed=1,
    )
    settings.update(overrides)
    if settings["compress"] != "topk":
        settings.pop("topk_ratio", None)  # only topk reads it, and validate refuses it elsewhere
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    config = make_config(algo, env, {**settings, "run_dir": str(run_dir)})
    validate(config)
    started = time.perf_counter()
    summary, _ = train(algo, config, progress=False)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    last = rows[-1]
    updates = [r["update_seconds"] for r in rows if "update_seconds" in r]
    lags = [r["policy_lag"] for r in rows if "policy_lag" in r]
    out: dict[str, Any] = {
        "sps": last["sps"],
        "sps_workers": [last[f"sps_worker_{r}"] for r in range(workers) if f"sps_worker_{r}" in last],
        "update_ms": 1000 * statistics.fmean(updates) if updates else None,
        "update_ms_rows": [1000 * u for u in updates],
        "bytes_per_update": last.get("bytes_per_update"),
        "bytes_sent": last.get("bytes_sent"),
        "comm_seconds": last.get("comm_seconds"),
        "loop_seconds": last["wall_time"],
        "run_seconds": seconds,  # the whole call: processes, group, training, evaluation
        "env_steps": last["env_steps"],
        "mean_return": summary.get("mean_return"),
        "settings": settings,
        "config": config_dict(config),
    }
    if lags:
        out["policy_lag"] = statistics.fmean(lags)
        out["policy_lag_max"] = max(r.get("policy_lag_max", 0.0) for r in rows)
        out["dropped_gradients"] = last.get("dropped_gradients_all", last.get("dropped_gradients"))
    if "parameter_server" in summary:
        out["parameter_server"] = summary["parameter_server"]
    return out


def _shared_config(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The full config of a set of runs, stored once (each run keeps only its overrides)."""
    configs = [r.pop("config") for r in runs]
    return configs[0] if configs else {}


def _local_only() -> None:
    """Before Ray is imported: a local Ray binds 127.0.0.1 only, and so do gloo's connections."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")


@contextlib.contextmanager
def ray_session(shared: bool, num_cpus: int) -> Iterator[str | None]:
    """Yields why the ray rows cannot run here, or None; with ``shared``, one Ray for all rows.

    Unshared (the default), every run starts and stops its own local Ray, as ``shoal train
    --backend ray`` does (~5 s more per run, outside the timed part). Shared, one Ray serves
    every row; either way every actor is on this machine, so shoal's group meets through a
    file and nothing listens beyond 127.0.0.1.
    """
    _local_only()
    try:
        import ray
    except ImportError:
        yield "ray not installed (pip install 'shoal[ray]')"
        return
    if not shared:
        yield None
        return
    import logging

    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield None
    finally:
        ray.shutdown()


# -- parts --------------------------------------------------------------------------------------
def part_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every (env, backend, strategy) cell at every worker count; key cells repeated."""
    cells = [(e, b, s) for e in args.envs for b in args.backends for s in args.strategies]
    repeats = {c: args.repeats if c in KEY_ROWS else args.other_repeats for c in cells}
    runs: dict[tuple[str, str, str], dict[int, list[dict[str, Any]]]] = {
        c: {n: [] for n in args.workers} for c in cells
    }
    skipped: dict[str, str] = {}
    for backend in args.backends:
        mine = [c for c in cells if c[1] == backend]
        cpus = max(os.cpu_count() or 1, *args.workers)
        session = ray_session(args.shared_ray, cpus) if backend == "ray" else None
        with session or contextlib.nullcontext(None) as why:
            if why:
                skipped[backend] = why
                print(f"  skipping the {backend} rows: {why}", flush=True)
                continue
            for r in range(max(repeats[c] for c in mine)):
                for cell in mine:
                    if r >= repeats[cell]:
                        continue
                    env, _, strategy = cell
                    name, algo = cell_algo(strategy, args.algo)
                    k = r % len(args.workers)  # rotate which worker count goes first
                    for n in args.workers[k:] + args.workers[:k]:
                        res = run_one(work, algo, env, backend, name, n, args.steps[env])
                        runs[cell][n].append(res)
                        ms = f"{res['update_ms']:.1f}" if res["update_ms"] is not None else "-"
                        print(
                            f"  {env} {backend} {strategy} x{n} (repeat {r}): "
                            f"{res['sps']:,.0f} env steps/s, {ms} ms/update, {res['run_seconds']:.1f} s",
                            flush=True,
                        )
    results: list[dict[str, Any]] = []
    for (env, backend, strategy), by_n in runs.items():
        if backend in skipped:
            continue
        name, algo = cell_algo(strategy, args.algo)
        row: dict[str, Any] = {"env": env, "backend": backend, "strategy": name, "algo": algo, "workers": {}}
        row["config"] = _shared_config([x for rs in by_n.values() for x in rs])
        for n, rs in by_n.items():
            sps = [x["sps"] for x in rs]
            ms = [x["update_ms"] for x in rs if x["update_ms"] is not None]
            row["workers"][str(n)] = {
                "sps": statistics.median(sps),
                "update_ms": statistics.median(ms) if ms else None,
                "sps_runs": sps,
                "runs": rs,
            }
        base = by_n.get(1, [])
        for n, rs in by_n.items():
            if n != 1 and base:
                # Same repeat, same round: a paired ratio per repeat, besides the ratio of medians.
                row["workers"][str(n)]["ratio_runs"] = [a["sps"] / b["sps"] for a, b in zip(rs, base)]
                row["workers"][str(n)]["ratio"] = row["workers"][str(n)]["sps"] / row["workers"]["1"]["sps"]
        results.append(row)
    return {
        "algo": args.algo,
        "steps_per_worker": dict(args.steps),
        "worker_counts": list(args.workers),
        "repeats_key_rows": args.repeats,
        "repeats_other_rows": args.other_repeats,
        "skipped": skipped,
        "rows": results,
    }


def part_bytes(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Bytes per optimizer step, 2 mp workers on CartPole, per strategy and compression."""
    rows: list[dict[str, Any]] = []
    extra = {"topk_ratio": args.topk_ratio}
    for strategy in args.bytes_strategies:
        row: dict[str, Any] = {"strategy": strategy, "compress": {}}
        for mode in COMPRESS:
            res = run_one(
                work, args.algo, "CartPole-v1", "mp", strategy, 2, args.bytes_steps, compress=mode, **extra
            )
            row["compress"][mode] = res
            print(
                f"  CartPole-v1 mp {strategy} x2 compress {mode}: "
                f"{res['bytes_per_update']:,.0f} bytes/update, {res['sps']:,.0f} env steps/s",
                flush=True,
            )
        row["config"] = _shared_config(list(row["compress"].values()))
        none, topk = row["compress"]["none"], row["compress"]["topk"]
        row["none_over_topk"] = none["bytes_per_update"] / topk["bytes_per_update"]
        rows.append(row)
    return {
        "algo": args.algo,
        "steps_per_worker": args.bytes_steps,
        "topk_ratio": args.topk_ratio,
        "rows": rows,
    }


def part_solve(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """PPO, sync, 2 mp workers x 4 envs on CartPole, top-k vs none: the greedy return at the end."""
    from shoal.agent import make_config

    budget = (
        make_config("ppo", "CartPole-v1", {}).total_steps if args.solve_steps is None else args.solve_steps
    )
    runs: list[dict[str, Any]] = []
    for seed in args.solve_seeds:
        for mode in args.solve_compress:
            res = run_one(
                work,
                "ppo",
                "CartPole-v1",
                "mp",
                "sync",
                2,
                budget // 2,
                compress=mode,
                topk_ratio=args.topk_ratio,
                num_envs=4,
                seed=seed,
                eval_episodes=20,
                log_every=2_000,
                checkpoint_every=0,  # shoal's default
            )
            res.update(compress=mode, seed=seed, solved=res["mean_return"] >= SOLVED)
            runs.append(res)
            print(
                f"  solve seed {seed} compress {mode}: greedy return {res['mean_return']:.1f} "
                f"({res['run_seconds']:.1f} s)",
                flush=True,
            )
    return {"budget": budget, "num_envs": 4, "workers": 2, "topk_ratio": args.topk_ratio, "runs": runs}


# -- report -------------------------------------------------------------------------------------
def _k(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def _bytes(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1024:.1f} KiB" if v >= 1024 else f"{v:.0f} B"


def tables(report: dict[str, Any]) -> str:
    """The markdown tables of whichever parts the report holds."""
    out: list[str] = []
    if "throughput" in report:
        t = report["throughput"]
        counts = t["worker_counts"]
        head = ["env", "backend", "strategy", "algo", "runs"]
        head += [f"{n}w steps/s" for n in counts] + [f"{n}w/1w" for n in counts if n != 1]
        head += [f"{n}w ms/update" for n in counts]
        out += [
            "Training throughput (median over runs; env steps/s summed over workers)",
            "",
            "| " + " | ".join(head) + " |",
            "|---" * len(head) + "|",
        ]
        for row in t["rows"]:
            w = row["workers"]
            cells = [row["env"].split("/")[-1], row["backend"], row["strategy"], row.get("algo", t["algo"])]
            cells.append(str(max(len(w[str(n)]["sps_runs"]) for n in counts)))
            cells += [_k(w[str(n)]["sps"]) for n in counts]
            cells += [
                f"**{w[str(n)]['ratio']:.2f}x**" if "ratio" in w[str(n)] else "-" for n in counts if n != 1
            ]
            cells += [
                f"{w[str(n)]['update_ms']:.1f}" if w[str(n)]["update_ms"] is not None else "-" for n in counts
            ]
            out.append("| " + " | ".join(cells) + " |")
        for backend, why in t.get("skipped", {}).items():
            out.append(f"\n({backend} rows skipped: {why})")
        out.append("")
    if "bytes" in report:
        b = report["bytes"]
        pct = f"{100 * b['topk_ratio']:g}%"
        out += [
            f"Bytes sent per optimizer step and worker, CartPole-v1, 2 mp workers (topk at {pct})",
            "",
            "| strategy | none | fp16 | topk | none/topk | none steps/s | fp16 steps/s | topk steps/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in b["rows"]:
            c = row["compress"]
            out.append(
                f"| {row['strategy']} | "
                + " | ".join(_bytes(c[m]["bytes_per_update"]) for m in COMPRESS)
                + f" | **{row['none_over_topk']:.1f}x** | "
                + " | ".join(_k(c[m]["sps"]) for m in COMPRESS)
                + " |"
            )
        out.append("")
    if "solve" in report:
        s = report["solve"]
        out += [
            f"PPO sync, 2 mp workers x {s['num_envs']} envs, CartPole-v1, {s['budget']:,} env steps",
            "",
            "| compress | seed | greedy return (20 episodes) | solved (>= 475) | env steps/s | run s |",
            "|---|---|---|---|---|---|",
        ]
        for r in s["runs"]:
            mode = r["compress"] + (f" {100 * s['topk_ratio']:g}%" if r["compress"] == "topk" else "")
            out.append(
                f"| {mode} | {r['seed']} | {r['mean_return']:.1f} | {'yes' if r['solved'] else 'no'} | "
                f"{_k(r['sps'])} | {r['run_seconds']:.0f} |"
            )
        out.append("")
    if "decoupled" in report:
        out += decoupled.table(report["decoupled"])
    if "decoupled-solve" in report:
        out += decoupled.solve_table(report["decoupled-solve"])
    return "\n".join(out)


def claims(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, as measured values: scaling ratios, byte ratios, the topk return."""
    found: list[dict[str, Any]] = []
    throughput = report.get("throughput", {})
    for row in throughput.get("rows", []):
        algo = row.get("algo", throughput.get("algo"))
        cell = row["strategy"] + ("" if algo == throughput.get("algo") else f":{algo}")
        if (row["env"], row["backend"], cell) in KEY_ROWS and "ratio" in row["workers"].get("2", {}):
            found.append(
                {
                    "what": f"{row['env'].split('/')[-1]} {row['backend']} {row['strategy']} ({algo}), "
                    "2 workers / 1 worker env steps/s",
                    "value": row["workers"]["2"]["ratio"],
                    "target": SCALING_TARGET,
                    "unit": "x",
                }
            )
    for row in report.get("bytes", {}).get("rows", []):
        found.append(
            {
                "what": f"bytes per update, none / topk, {row['strategy']}",
                "value": row["none_over_topk"],
                "target": BYTES_TARGET,
                "unit": "x",
            }
        )
    if "decoupled" in report:
        found += decoupled.claims(report["decoupled"])
    found += decoupled.solve_claims(report.get("decoupled-solve", {}))
    for r in report.get("solve", {}).get("runs", []):
        if r["compress"] == "topk":
            found.append(
                {
                    "what": f"PPO sync + topk, 2 mp workers, CartPole-v1, {report['solve']['budget']:,} "
                    f"steps (seed {r['seed']}): greedy return",
                    "value": r["mean_return"],
                    "target": SOLVED,
                    "unit": "",
                }
            )
    return found


def claim_lines(found: list[dict[str, Any]]) -> list[str]:
    lines = []
    for c in found:
        lower = c.get("lower", False)
        met = c["value"] <= c["target"] if lower else c["value"] >= c["target"]
        verdict = "ok" if met else ("ABOVE TARGET" if lower else "BELOW TARGET")
        value = f"{c['value']:.2f}x" if c["unit"] == "x" else f"{c['value']:.1f}"
        sign = "<=" if lower else ">="
        lines.append(f"- {c['what']}: **{value}** (target {sign} {c['target']:g}{c['unit']}, {verdict})")
    return lines


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Throughput bars per env (one bar per worker count) and bytes per update (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    t, b = report.get("throughput"), report.get("bytes")
    envs = list(dict.fromkeys(r["env"] for r in t["rows"])) if t else []
    panels = len(envs) + (b is not None)
    if not panels:
        return None
    # One panel per row of the figure: the throughput of each env, then the bytes.
    groups = max([len([r for r in t["rows"] if r["env"] == e]) for e in envs] + [len(b["rows"]) if b else 0])
    fig, axes = plt.subplots(panels, 1, figsize=(max(7.0, 2.0 + 1.3 * groups), 4.2 * panels), squeeze=False)
    axes = list(axes[:, 0])
    for ax, env in zip(axes, envs):
        rows = [r for r in t["rows"] if r["env"] == env]
        counts = t["worker_counts"]
        x = np.arange(len(rows))
        width = 0.8 / len(counts)
        for i, n in enumerate(counts):
            vals = [r["workers"][str(n)]["sps"] for r in rows]
            bars = ax.bar(
                x + (i - (len(counts) - 1) / 2) * width, vals, width, label=f"{n} worker{'s' * (n > 1)}"
            )
            if n != 1:
                labels = [f"{r['workers'][str(n)].get('ratio', 0):.2f}x" for r in rows]
                ax.bar_label(bars, labels, fontsize=8, padding=2)
        ax.set_xticks(
            x, [f"{r['backend']}\n{r['strategy']}\n{r.get('algo', t['algo'])}" for r in rows], fontsize=8
        )
        ax.set_title(f"{env}: training env steps/s")
        ax.set_ylabel("env steps/s, all workers (median)")
        ax.yaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
        ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room for the ratio labels
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    if b:
        ax = axes[-1]
        x = np.arange(len(b["rows"]))
        width = 0.8 / len(COMPRESS)
        for i, mode in enumerate(COMPRESS):
            vals = [r["compress"][mode]["bytes_per_update"] for r in b["rows"]]
            label = f"topk {100 * b['topk_ratio']:g}%" if mode == "topk" else mode
            bars = ax.bar(x + (i - 1) * width, vals, width, label=label)
            ax.bar_label(bars, [_bytes(v) for v in vals], fontsize=7, padding=2)
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 3)  # room for the labels
        ax.set_ylabel("bytes per optimizer step (log)")
        ax.set_xticks(x, [r["strategy"] for r in b["rows"]], fontsize=9)
        ax.set_title("bytes each worker sends per optimizer step, CartPole-v1, 2 mp workers")
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    from shoal.algos import ALGORITHMS

    parser = argparse.ArgumentParser(prog="shoal bench scaling", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part",
        nargs="+",
        default=["throughput", "bytes", "solve", "decoupled"],
        choices=["throughput", "bytes", "solve", "decoupled", "decoupled-solve"],
        help="decoupled-solve: the CartPole time-to-475 runs of decoupled alone",
    )
    parser.add_argument(
        "--algo", default="ppo", choices=list(ALGORITHMS), help="throughput, bytes: algorithm"
    )
    parser.add_argument("--envs", nargs="+", default=ENVS, choices=ENVS, help="throughput: env ids")
    parser.add_argument(
        "--backends", nargs="+", default=BACKENDS, choices=BACKENDS, help="throughput: backends"
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=STRATEGIES,
        help="throughput: strategies, each optionally STRATEGY:ALGO (default algorithm: --algo)",
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        type=int,
        default=default_workers(),
        help="throughput: worker counts (1 is always run)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="throughput: runs of the key rows (heavy, mp)")
    parser.add_argument("--other-repeats", type=int, default=1, help="throughput: runs of the other rows")
    parser.add_argument(
        "--cartpole-steps",
        type=int,
        default=STEPS_PER_WORKER["CartPole-v1"],
        help="throughput: env steps per worker on CartPole-v1",
    )
    parser.add_argument(
        "--heavy-steps",
        type=int,
        default=STEPS_PER_WORKER[HEAVY],
        help="throughput: env steps per worker, heavy env",
    )
    parser.add_argument("--bytes-steps", type=int, default=10_000, help="bytes: env steps per worker")
    parser.add_argument("--topk-ratio", type=float, default=0.01, help="bytes, solve: fraction topk sends")
    parser.add_argument(
        "--solve-steps", type=int, default=None, help="solve: env steps in all (default: shoal's preset)"
    )
    parser.add_argument("--solve-seeds", nargs="+", type=int, default=[1], help="solve: seeds")
    parser.add_argument(
        "--solve-compress", nargs="+", default=["topk", "none"], choices=COMPRESS, help="solve: modes"
    )
    parser.add_argument("--decoupled-env", default=HEAVY, choices=ENVS, help="decoupled: env id")
    parser.add_argument("--actor-envs", type=int, default=8, help="decoupled: envs per actor (and worker)")
    parser.add_argument(
        "--actor-steps", type=int, default=40_000, help="decoupled: env steps per actor (and PPO worker)"
    )
    parser.add_argument("--sb3-steps", type=int, default=20_000, help="decoupled: SB3's env steps")
    parser.add_argument("--decoupled-repeats", type=int, default=3, help="decoupled: runs of every row")
    parser.add_argument(
        "--solve-seeds-decoupled",
        dest="solve_seeds_decoupled",
        nargs="*",
        type=int,
        default=[1, 2, 3, 4, 5],
        help="decoupled: seeds of the CartPole time-to-475 runs (none: skip them)",
    )
    parser.add_argument("--solve-every", type=int, default=5_000, help="decoupled: env steps between evals")
    parser.add_argument(
        "--solve-repeats", type=int, default=1, help="decoupled: runs of every time-to-475 seed, each side"
    )
    parser.add_argument("--solve-budget", type=int, default=100_000, help="decoupled: most env steps per run")
    parser.add_argument(
        "--shared-ray",
        action="store_true",
        help="one local Ray for all ray rows (~5 s less per run)",
    )
    parser.add_argument("--out", default="benchmarks/results/scaling.json", help="JSON output")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every part, ~2 minutes")
    args = parser.parse_args(argv)
    _local_only()  # before anything imports Ray
    if args.quick:
        args.envs = [e for e in args.envs if e == HEAVY] or args.envs
        args.strategies = [s for s in args.strategies if s.partition(":")[0] in ("sync", "a3c")]
        args.repeats, args.other_repeats = 1, 1
        args.cartpole_steps, args.heavy_steps, args.bytes_steps = 6_000, 3_000, 2_000
        args.solve_steps, args.solve_compress = 20_000, ["topk"]
        args.bytes_strategies = ["sync", "a3c"]
        args.actor_steps, args.sb3_steps, args.decoupled_repeats = 4_000, 2_048, 1
        args.solve_seeds_decoupled, args.solve_budget = [1], 10_000
    else:
        args.bytes_strategies = ["sync", "param-avg", "param-server", "a3c"]
    args.workers = sorted(set(args.workers) | {1})
    args.steps = {"CartPole-v1": args.cartpole_steps, HEAVY: args.heavy_steps}

    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    report: dict[str, Any] = {
        "benchmark": "scaling",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine("numpy", "gymnasium", "torch", "ray"),
        "settings": {k: v for k, v in vars(args).items() if k != "steps"},
    }
    if out.exists():  # keep parts measured by earlier invocations
        report = {**json.loads(out.read_text()), **report}
    started = time.perf_counter()
    parts = {
        "throughput": part_throughput,
        "bytes": part_bytes,
        "solve": part_solve,
        "decoupled": decoupled.part_decoupled,
        "decoupled-solve": decoupled.part_solve_time,
    }
    with tempfile.TemporaryDirectory(prefix="shoal-bench-scaling-") as tmp:
        for part in args.part:
            print(f"{part} ...", flush=True)
            t0 = time.perf_counter()
            report[part] = parts[part](args, Path(tmp))
            report[part]["seconds"] = time.perf_counter() - t0
            report[part]["date"] = report["date"]
            report[part]["quick"] = args.quick
    found = claims(report)
    report["ratios"] = found
    report["seconds"] = time.perf_counter() - started
    text = "\n".join([tables(report), *claim_lines(found)])
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(text + "\n")
    png = plot(report, out.with_suffix(".png"))
    wrote = ", ".join(str(p) for p in (out, out.with_suffix(".md"), png) if p)
    print(f"\nwrote {wrote} in {report['seconds']:.0f} s")
    return 0

"""Learning curves: episode return against env steps, one line per run or per group of seeds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(config, env steps, episode return) of a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a shoal run directory?")
    config = (
        yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    )
    steps, returns = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "episode_return" in row:
            steps.append(row["env_steps"])
            returns.append(row["episode_return"])
    return config or {}, np.asarray(steps, dtype=float), np.asarray(returns, dtype=float)


def group_key(config: dict[str, Any]) -> str:
    """Runs that differ only in seed (and where they were written) share a group."""
    same = {k: v for k, v in config.items() if k not in ("seed", "run_dir")}
    return json.dumps(same, sort_keys=True, default=str)


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write a PNG with one curve per group; several seeds give a mean and a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups: dict[str, list[tuple[dict, np.ndarray, np.ndarray]]] = {}
    for run in run_dirs:
        config, steps, returns = read_run(run)
        groups.setdefault(group_key(config), []).append((config, steps, returns))
    fig, ax = plt.subplots(figsize=(8, 5))
    for runs in groups.values():
        config = runs[0][0]
        label = f"{config.get('algo', '?')} on {config.get('env', '?')}"
        if len(runs) == 1:
            _, steps, returns = runs[0]
            ax.plot(steps, returns, label=f"{label} (seed {config.get('seed', '?')})")
            continue
        grid = np.linspace(0, min(r[1].max() for r in runs if len(r[1])), 200)
        curves = np.array([np.interp(grid, s, r) for _, s, r in runs if len(s)])
        line = ax.plot(grid, curves.mean(0), label=f"{label} ({len(curves)} seeds, min-max)")[0]
        ax.fill_between(grid, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("env steps")
    ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
    ax.set_ylabel("episode return")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

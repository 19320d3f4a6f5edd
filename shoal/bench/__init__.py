"""Benchmarks shipped with shoal (``shoal bench ...``); thin runners live in ``benchmarks/``."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from typing import Any


def machine(*packages: str) -> dict[str, Any]:
    """What a result depends on: cores, platform, Python and the versions of ``packages``
    (None for one that is not installed), recorded in every benchmark's JSON."""
    out: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for name in packages:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def gemm_rate(threads: int, n: int = 256, repeats: int = 2000) -> float:
    """GFLOP/s of one n x n x n float32 matrix product on ``threads`` torch threads: what
    this machine's cores give the dense layers that bound small-network training on CPU."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(50):
            a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(before)


def plot_curves(
    panels: dict[str, dict[str, list[list[tuple[float, float]]]]], path: Path, ylabel: str = "greedy return"
) -> None:
    """One panel per title; in each, one line per label: the mean over its runs' curves of
    (env steps, value) points, shaded between their min and max (cut to the shortest run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, runs in lines.items():
            curves = [np.asarray(c, dtype=float) for c in runs if len(c)]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = curves[0][:n, 0]
            vals = np.stack([c[:n, 1] for c in curves])
            line = ax.plot(steps, vals.mean(0), label=f"{label} ({len(curves)} seeds)")[0]
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("env steps")
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

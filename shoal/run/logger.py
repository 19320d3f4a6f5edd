"""Run logging: metrics.jsonl (survives crashes), TensorBoard scalars, and progress.

Progress is a live rich bar on a terminal, and periodic plain lines otherwise (CI logs,
files), so a run is never silent and never floods a log.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from shoal.run.checkpoint import RunWriteError, write_text_atomic


def distributed_summary(metrics: dict[str, float]) -> str:
    """Per-worker SPS, policy lag, bytes per update and time in communication, for the progress line."""
    parts = []
    workers = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in metrics.items() if k.startswith("sps_worker_"))
    if workers:
        parts.append("workers " + "/".join(f"{v:,.0f}" for _, v in workers) + " sps")
    if "actor_sps" in metrics:
        parts.append(f"actors {metrics['actor_sps']:,.0f} sps")
    if "queue_fill" in metrics:
        parts.append(f"queue {100 * metrics['queue_fill']:.0f}%")
    if "learner_busy" in metrics:
        parts.append(f"learner busy {100 * metrics['learner_busy']:.0f}%")
    if "policy_lag" in metrics:
        lag = f"lag {metrics['policy_lag']:.2g}"
        parts.append(lag + (f" (max {metrics['policy_lag_max']:.0f})" if "policy_lag_max" in metrics else ""))
    if "bytes_per_update" in metrics:
        parts.append(f"{metrics['bytes_per_update'] / 1e3:,.3g} kB/update")
    if metrics.get("wall_time") and "comm_seconds" in metrics:
        parts.append(f"comm {100 * metrics['comm_seconds'] / metrics['wall_time']:.0f}%")
    return " | ".join(parts)


def open_append(path: Path) -> TextIO:
    """``path`` opened for appending, line-buffered, never through a link planted at its name."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "a", buffering=1)


def _step(row: str) -> float:
    """A metrics row's env steps; inf for a row a killed run left half-written (it is dropped)."""
    try:
        return float(json.loads(row)["env_steps"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class RunLogger:
    """Writes one JSON row per ``log`` call and shows progress towards ``total_steps``."""

    def __init__(
        self,
        run_dir: str | Path | None,
        total_steps: int,
        *,
        progress: bool = True,
        tensorboard: bool = True,
        start_step: int = 0,
        plain_every_s: float = 5.0,
    ) -> None:
        self.total, self.start = total_steps, start_step
        self.file = None
        self.writer = None
        if run_dir is not None:
            path = Path(run_dir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(path):  # a resumed run: drop rows past its checkpoint (a link: replaced)
                text = "" if path.is_symlink() else path.read_text()
                rows = [r for r in text.splitlines() if _step(r) <= start_step]
                write_text_atomic(path, "".join(r + "\n" for r in rows))  # killed meanwhile: old rows stay
            self.file, self.path = open_append(path), path
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
        self.bar = None
        self.plain = progress and not sys.stdout.isatty()
        self.plain_every_s = plain_every_s
        self._last_plain = 0.0
        self.recent_return = math.nan
        if progress and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} steps"),
                TextColumn("{task.fields[sps]} sps"),
                TextColumn("return {task.fields[ret]}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[extra]}"),
            )
            self.task = self.bar.add_task(
                "training", total=total_steps, completed=start_step, sps="-", ret="-", extra=""
            )
            self.bar.start()

    def log(self, env_steps: int, metrics: dict[str, float], *, progress: bool = True) -> None:
        """Append a row (and its TensorBoard scalars); ``progress``: also show it as progress."""
        row: dict[str, Any] = {"env_steps": env_steps, **metrics}
        if self.file is not None:
            try:
                self.file.write(json.dumps(row) + "\n")
            except OSError as e:  # a full disk: one line (exit 1), not a traceback
                raise RunWriteError(f"cannot append to {self.path}: {e.strerror or e}") from None
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, env_steps)
        if not progress:
            return
        if "episode_return" in metrics:
            self.recent_return = metrics["episode_return"]
        sps = metrics.get("sps", math.nan)
        ret = "-" if math.isnan(self.recent_return) else f"{self.recent_return:.1f}"
        extra = distributed_summary(metrics)
        if self.bar is not None:
            self.bar.update(self.task, completed=env_steps, sps=f"{sps:,.0f}", ret=ret, extra=extra)
        elif self.plain:
            now = time.monotonic()
            if now - self._last_plain >= self.plain_every_s or env_steps >= self.total:
                self._last_plain = now
                pct = 100 * env_steps / max(1, self.total)
                eta = max(0, self.total - env_steps) / sps if sps and sps > 0 else math.nan
                eta_s = "-" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
                print(
                    f"shoal: step {env_steps:,}/{self.total:,} ({pct:.0f}%) | {sps:,.0f} sps | return {ret}"
                    f"{' | ' + extra if extra else ''} | eta {eta_s}",
                    flush=True,
                )

    def histogram(self, tag: str, values: list[float], env_steps: int) -> None:
        """A TensorBoard histogram (the rows in metrics.jsonl hold their summaries)."""
        if self.writer is not None and values:
            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), env_steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.file is not None:
            self.file.close()
            self.file = None

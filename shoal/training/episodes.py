"""What the loop knows about episodes: their running returns, and envs that had to restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Episodes:
    """Return and length of each env's episode in progress; finished ones wait for a metrics row.

    An episode that ends without its env saying so (a checkpoint boundary starts fresh ones,
    an env was restarted or quarantined) is *cut*: it is not logged as a finished episode,
    whose return it would understate, but counted, so a reader can tell how many there were.
    """

    def __init__(self, num_envs: int, games: bool = False) -> None:
        self.games = games  # the envs report whole games (Atari): log those, not their episodes
        self.ret = np.zeros(num_envs)
        self.length = np.zeros(num_envs, dtype=np.int64)
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.cut_count = 0

    def end(
        self,
        rewards: np.ndarray,
        valid: np.ndarray,
        done: np.ndarray,
        games: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Add a step's rewards (``valid`` envs only); return (the mask of envs whose episode
        this step finished, their returns, their lengths), for those envs only.

        ``games``: (ended, raw scores, lengths) of the whole games the envs reported this step
        (:func:`shoal.envs.atari.game_scores`; None: none ended). With ``self.games`` those
        are what finishes instead of episodes: an Atari learner's rewards are clipped and its
        episodes are single lives, which is not the score anyone compares.
        """
        self.ret += np.where(valid, rewards, 0.0)
        self.length += valid
        if not self.games:
            ended = done & valid
            returns, lengths = self.ret[ended], self.length[ended]
        elif games is None:
            ended = np.zeros(len(valid), dtype=bool)
            returns, lengths = np.zeros(0), np.zeros(0, dtype=np.int64)
        else:
            ended = games[0] & valid
            returns, lengths = games[1][ended], games[2][ended]
        if returns.size:
            self.ret[ended] = 0.0
            self.length[ended] = 0
        return ended, returns, lengths

    def step(
        self,
        rewards: np.ndarray,
        valid: np.ndarray,
        done: np.ndarray,
        games: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """:meth:`end` a step, keeping the finished episodes for the next metrics row."""
        _, returns, lengths = self.end(rewards, valid, done, games)
        if returns.size:
            self.returns.extend(returns.tolist())
            self.lengths.extend(lengths.tolist())

    def cut(self, envs: np.ndarray | None = None) -> None:
        """The episodes of ``envs`` (a bool mask; None: all) end early and are not logged."""
        envs = slice(None) if envs is None else envs
        self.cut_count += int(np.count_nonzero(self.length[envs]))
        self.ret[envs] = 0.0
        self.length[envs] = 0

    def drain(self) -> dict[str, float]:
        """The statistics of the episodes finished since the last call, for a metrics row."""
        row = {"episodes_cut": float(self.cut_count)}
        if self.returns:
            row["episode_return"] = float(np.mean(self.returns))
            row["episode_length"] = float(np.mean(self.lengths))
            self.returns.clear()
            self.lengths.clear()
        return row


class RestartLimitError(RuntimeError):
    """More env restarts than ``max_restarts``: the env is broken, not unlucky."""


class EnvFaults:
    """Counts env restarts reported by the vector env and says when they are too many.

    A restart is one env made anew after it raised (``info["env_restarted"]``) or one env
    worker process started again after it died or hung (``envs.worker_restarts``).
    """

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.env_restarts = 0
        self.worker_restarts = 0

    @property
    def restarts(self) -> int:
        return self.env_restarts + self.worker_restarts

    @property
    def exhausted(self) -> bool:
        return self.restarts > self.max_restarts

    def lost_envs(self, infos: dict[str, Any], envs: Any) -> np.ndarray | None:
        """The mask of envs restarted during this step, or None (the common case, checked cheaply)."""
        if "env_restarted" not in infos and "env_worker_restarted" not in infos:
            return None
        lost = np.zeros(envs.num_envs, dtype=bool)
        if "env_restarted" in infos:
            restarted = infos["_env_restarted"] & infos["env_restarted"].astype(bool)
            self.env_restarts += int(restarted.sum())
            lost |= restarted
        if "env_worker_restarted" in infos:
            lost |= infos["_env_worker_restarted"]
            self.worker_restarts = envs.worker_restarts
        return lost

    def metrics(self) -> dict[str, float]:
        return {"env_restarts": float(self.env_restarts), "env_worker_restarts": float(self.worker_restarts)}

    def error(self, checkpoint: Path | None) -> RestartLimitError:
        saved = f"; checkpoint saved to {checkpoint}" if checkpoint else ""
        return RestartLimitError(
            f"envs were restarted {self.restarts} times ({self.env_restarts} env errors, "
            f"{self.worker_restarts} dead or hung env workers), more than --max-restarts "
            f"{self.max_restarts}; the warnings above say why{saved}"
        )

"""Episode statistics: what is logged as a finished episode, and what was cut short."""

from __future__ import annotations

import json
import logging

import numpy as np

from shoal.agent import make_config
from shoal.algos import ALGORITHMS
from shoal.training.episodes import Episodes
from shoal.training.trainer import Trainer


def test_cut_episodes_are_counted_and_never_logged_as_finished():
    ep = Episodes(3)
    ones, valid = np.ones(3), np.ones(3, dtype=bool)
    for _ in range(4):
        ep.step(ones, valid, np.zeros(3, dtype=bool))
    ep.step(ones, valid, np.array([True, False, False]))  # env 0 finishes: 5 steps, return 5
    ep.cut(np.array([False, True, False]))  # env 1 restarted mid-episode
    ep.step(ones, np.array([True, True, False]), np.array([False, True, True]))  # env 2's step is invalid
    row = ep.drain()
    # Finished: env 0 after 5 steps (return 5), env 1 after its restart, 1 step (return 1).
    assert row == {"episodes_cut": 1.0, "episode_return": 3.0, "episode_length": 3.0}
    ep.cut()  # a checkpoint boundary: envs 0 (1 step) and 2 (5 steps) in progress
    assert ep.drain() == {"episodes_cut": 3.0}


def test_a_tight_checkpoint_interval_is_said_once_and_cut_episodes_reach_the_metrics(tmp_path, caplog):
    config = make_config(
        "ppo",
        "CartPole-v1",
        dict(
            total_steps=4096,
            checkpoint_every=1024,
            log_every=1024,
            vectorization="sync",
            run_dir=str(tmp_path),
        ),
    )
    with caplog.at_level(logging.WARNING, logger="shoal"):
        Trainer(ALGORITHMS["ppo"], config, progress=False).train()
    warned = [
        r.message for r in caplog.records if "--checkpoint-every 1024 gives each env 128 steps" in r.message
    ]
    assert len(warned) == 1, caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    cut = [r["episodes_cut"] for r in rows]
    assert cut == sorted(cut) and cut[-1] >= 8  # (at each boundary, every episode not just ended)
    assert all(r.get("episode_length", 0) <= 128 for r in rows)  # the cap the warning speaks of

"""``shoal bench scaling --part decoupled-solve``: repeats of the time-to-475 runs, and their medians."""

from __future__ import annotations

import argparse
import itertools

import pytest

import shoal.bench.decoupled as decoupled
import shoal.bench.sb3 as sb3
import shoal.training.decoupled as trainer_module


def test_time_to_solve_repeats_every_seed_and_claims_the_ratio_of_the_medians_over_all_runs(
    monkeypatch, tmp_path
):
    appo_seconds = itertools.count(1.0)  # 1, 2, 3, 4 s: each APPO run slower than the one before
    monkeypatch.setattr(trainer_module, "DecoupledTrainer", lambda *a, **k: None)
    monkeypatch.setattr(decoupled, "_have_sb3", lambda: True)
    monkeypatch.setattr(decoupled, "_sb3_rl_zoo_cartpole", lambda seed: None)
    monkeypatch.setattr(
        sb3, "run_shoal", lambda *a, **k: {"solved_at": (10_000, next(appo_seconds)), "curve": []}
    )
    monkeypatch.setattr(sb3, "run_sb3", lambda *a, **k: {"solved_at": (10_000, 10.0), "curve": []})
    args = argparse.Namespace(
        solve_budget=20_000, solve_seeds_decoupled=[1, 2], solve_repeats=2, solve_every=5_000
    )
    part = decoupled.part_solve_time(args, tmp_path)

    assert [(r["seed"], r["repeat"]) for r in part["runs"]["appo"]] == [(1, 0), (2, 0), (1, 1), (2, 1)]
    assert len(part["runs"]["sb3 ppo rl-zoo"]) == 4
    assert part["median_seconds"] == {"appo": 2.5, "sb3 ppo rl-zoo": 10.0}
    assert part["ratio"] == pytest.approx(0.25)
    assert part["repeat_ratios"] == pytest.approx([0.15, 0.35])  # medians 1.5 s and 3.5 s
    (claim,) = decoupled.solve_claims(part)
    assert "4 runs (per repeat: 0.15, 0.35)" in claim["what"] and claim["lower"]
    table = "\n".join(decoupled.solve_table(part))
    assert "every seed run 2 times" in table and "| appo | 4 | 4 | 2.5 |" in table


def test_a_run_that_never_solves_counts_as_never():
    runs = [{"solved_at": (5_000, 1.0)}, {"solved_at": None}, {"solved_at": None}]
    assert decoupled._median_time(runs) == float("inf") and decoupled._median_time([]) is None

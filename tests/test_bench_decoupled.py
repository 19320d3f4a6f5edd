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


def test_the_decoupled_part_bounds_the_sb3_target_by_twice_what_one_core_steps(monkeypatch, tmp_path):
    """The envs alone on one core step 1,500/s and SB3 trains at 1,000/s: no training on two
    cores exceeds 3,000/s, so 3x SB3 is out of reach whatever appo does (printed as such). One
    core is measured right after each SB3 run: apart, the two read this machine's speed at
    different minutes (2 x one core over SB3 read 2.53x in a bench run, 3.76x minutes later)."""
    import shoal.bench.scaling as scaling

    raw = {"shoal-process": 2_900.0, "gym-sync": 1_500.0}
    calls = []

    def fake(name, sps):
        return lambda *a, **k: calls.append(name) or {"sps": sps}

    def fake_raw(*a, impl="shoal-process"):
        return fake(impl, raw[impl])()

    monkeypatch.setattr(decoupled, "run_raw", fake_raw)
    monkeypatch.setattr(decoupled, "run_decoupled", fake("decoupled", 2_500.0))
    monkeypatch.setattr(scaling, "run_one", fake("sync", 1_200.0))
    monkeypatch.setattr(decoupled, "run_sb3_ppo", fake("sb3", 1_000.0))
    monkeypatch.setattr(decoupled, "_have_sb3", lambda: True)
    args = argparse.Namespace(
        decoupled_env="shoal/HeavyCartPole-v1",
        actor_envs=8,
        actor_steps=1_000,
        sb3_steps=1_000,
        decoupled_repeats=2,
        solve_seeds_decoupled=[],
    )
    part = decoupled.part_decoupled(args, tmp_path)

    assert part["rows"]["one core"]["sps"] == 1_500.0 and list(part["rows"])[:2] == ["raw", "one core"]
    # measured right after each SB3 run: the machine's speed drifts over minutes
    assert [calls[i + 1] for i, c in enumerate(calls) if c == "sb3"] == ["gym-sync", "gym-sync"]
    assert calls.count("gym-sync") == 2
    assert part["ceiling_over"]["sb3 ppo"] == {"ratio": 3.0, "paired": [3.0, 3.0]}
    assert part["appo_x2_over"]["sb3 ppo"]["ratio"] == 2.5
    table = "\n".join(decoupled.table(part))
    assert "| one core | 1,500 |" in table
    assert "Ceiling over sb3 ppo: 2 x one core / sb3 ppo = 3.00x (3.00, 3.00 paired)" in table

"""``shoal bench zoo`` rows completed over several invocations (its parts take hours)."""

from __future__ import annotations

from shoal.bench.zoo import late_mean, merge_row, table


def _row(budget: int, **sides: list[tuple[int, float]]) -> dict:
    return {
        "env": "E",
        "budget": budget,
        "sides": {k: [{"seed": s, "final": f} for s, f in v] for k, v in sides.items()},
    }


def test_a_later_seed_joins_the_runs_measured_before():
    before = _row(300, shoal=[(1, 10.0)], sb3=[(1, 5.0)])
    merged = merge_row(before, _row(300, shoal=[(2, 20.0)], sb3=[(2, 6.0)]))
    assert merged["sides"] == _row(300, shoal=[(1, 10.0), (2, 20.0)], sb3=[(1, 5.0), (2, 6.0)])["sides"]


def test_a_rerun_seed_replaces_its_earlier_run_and_keeps_the_row_settings():
    before = {**_row(300, shoal=[(1, 10.0), (2, 20.0)]), "not_mapped": {"x": "y"}}
    merged = merge_row(before, _row(300, shoal=[(2, 30.0)]))
    assert merged["sides"]["shoal"] == [{"seed": 1, "final": 10.0}, {"seed": 2, "final": 30.0}]
    assert merged["not_mapped"] == {"x": "y"}


def test_runs_of_another_budget_are_dropped():
    merged = merge_row(_row(100, shoal=[(1, 10.0)]), _row(300, shoal=[(2, 20.0)]))
    assert merged["sides"]["shoal"] == [{"seed": 2, "final": 20.0}]


def test_rl_zoos_halfcheetah_entry_maps_onto_ppo_settings_entirely():
    from shoal.algos import ALGORITHMS
    from shoal.bench.zoo import RL_ZOO_HALFCHEETAH, rl_zoo_to_shoal

    settings, unmapped = rl_zoo_to_shoal(
        RL_ZOO_HALFCHEETAH, set(ALGORITHMS["ppo"].config_class.__dataclass_fields__)
    )
    assert unmapped == {}
    assert settings["activation"] == "relu" and settings["ortho_init"] is False
    assert settings["hidden"] == (256, 256) and settings["log_std_init"] == -2.0
    # SB3 weighs the squared error by vf_coef, shoal half of it: the same weight is twice the number
    assert settings["vf_coef"] == 2 * RL_ZOO_HALFCHEETAH["vf_coef"]


def test_sb3_gets_shoals_value_loss_weight_on_its_own_loss():
    from shoal.agent import make_config
    from shoal.bench.sb3 import sb3_ppo_kwargs

    config = make_config("ppo", "CartPole-v1", {"vf_coef": 0.8})
    assert sb3_ppo_kwargs(config)["vf_coef"] == 0.4


def test_one_side_rerun_keeps_the_other_sides_runs():
    before = _row(300, shoal=[(1, 10.0)], sb3=[(1, 5.0)])
    merged = merge_row(before, _row(300, shoal=[(1, 12.0)]))
    assert merged["sides"] == _row(300, shoal=[(1, 12.0)], sb3=[(1, 5.0)])["sides"]


def test_the_speed_table_prints_without_learning_rows():
    """``--rows speed`` alone measures no learning row: its table still prints."""
    sides = {"shoal": [61.4, 63.6], "sb3": [46.7, 50.8]}
    speed = {"env": "HalfCheetah-v5", "timed_steps": 3000}
    speed["sac"] = {"runs": sides, "median": {"shoal": 62.5, "sb3": 48.75}, "ratio": 62.5 / 48.75}
    text = table("offpolicy", {"rows": {}, "algo": "SAC and TD3", "speed": speed})
    assert "| 3,000 timed env steps | 62.5 | 48.8 | **1.28x** | >= 2x |" in text, text
    assert table("offpolicy", {"rows": {}, "algo": "SAC and TD3"}) == "offpolicy: no rows"


def test_the_late_mean_is_over_the_evaluations_in_the_second_half_of_the_budget():
    swings = {"final": 500.0, "curve": [[20_000, 500.0], [60_000, 500.0], [120_000, 100.0], [200_000, 500.0]]}
    assert late_mean(swings, 200_000) == 300.0  # the final 500 alone hides the fall at 120k
    assert late_mean({"final": None, "curve": []}, 200_000) is None  # a failed run
    row = {"budget": 200_000, "sides": {"a": [swings], "b": []}}
    part = {"algo": "DQN", "rows": {"DQN, CartPole-v1": row}}
    assert "| DQN, CartPole-v1 | 300.0 +- 0.0 (1) | - |" in table("distributed", part)


def test_kept_best_scores_the_best_curve_policy_on_the_final_episodes(monkeypatch, tmp_path):
    """SB3's side keeps a copy of the policy of its best periodic evaluation (as EvalCallback's
    best_model) and scores it as the final is scored; shoal's scores its best checkpoint."""
    import hashlib

    import pytest

    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO as SB3PPO

    from shoal.agent import make_config
    from shoal.bench import zoo

    calls = []
    real = zoo._greedy_sb3

    def recording(model, env_id, episodes, seed, obs_filter=None):
        params = b"".join(p.detach().numpy().tobytes() for p in model.policy.parameters())
        score = real(model, env_id, episodes, seed, obs_filter)
        calls.append((hashlib.sha256(params).hexdigest(), episodes, seed, score))
        return score

    monkeypatch.setattr(zoo, "_greedy_sb3", recording)
    # (a large learning rate: the policy peaks, then falls, so the best is not the last)
    model = SB3PPO(
        "MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, learning_rate=1e-2, seed=1, device="cpu"
    )
    result = zoo.run_sb3(model, "CartPole-v1", 2048, 1, 512, (2, 3))
    curve_calls = [c for c in calls if c[1] == 2]  # periodic (2 episodes), the end's included
    *_, final_call, _, kept_call = calls  # the final, the end's curve point, the kept best
    best = max(curve_calls, key=lambda c: c[3])  # the first of the highest, as kept
    assert [score for _, score in result["curve"]] == [c[3] for c in curve_calls]
    assert kept_call[0] == best[0] and kept_call[1:3] == (3, 1) and result["kept_best"] == kept_call[3]
    assert final_call[1:3] == (3, 1) and result["final"] == final_call[3]
    assert best is not curve_calls[-1] and best[0] != final_call[0], [c[3] for c in curve_calls]

    config = make_config(
        "ppo",
        "CartPole-v1",
        {"total_steps": 2048, "eval_every": 512, "eval_episodes": 3, "run_dir": str(tmp_path / "run")},
    )
    shoal_side = zoo.run_shoal("ppo", config)
    assert len(shoal_side["curve"]) == 4 and isinstance(shoal_side["kept_best"], float)


def test_a_run_of_one_side_alone_prints_its_table_without_a_comparison():
    """``--sides sb3`` into a fresh JSON: one side, nothing to compare it with (it crashed)."""
    part = {"algo": "PPO", "rows": {"RL-Zoo, HalfCheetah-v5": _row(300, sb3=[(1, 3522.8), (2, 4152.2)])}}
    text = table("ppo", part)
    assert (
        "| budget | sb3 |\n|---|---|---|\n| RL-Zoo, HalfCheetah-v5 | 300 | 3837.5 +- 314.7 (2) |" in text
    ), text

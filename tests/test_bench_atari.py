"""``shoal bench atari`` with tiny settings: its JSON's structure and positive rates."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ale_py")
pytest.importorskip("cv2")

from shoal.bench.atari import ALE_INFO, AtariFactory, QuietAtariFactory, _binned, _rates, main  # noqa: E402


def test_quiet_factory_drops_ale_per_step_info():
    loud, quiet = AtariFactory("ALE/Pong-v5")(), QuietAtariFactory("ALE/Pong-v5")()
    try:
        _, info = loud.reset(seed=0)
        assert set(ALE_INFO) <= set(info)
        _, info = quiet.reset(seed=0)
        assert info == {}
        obs, *_, info = quiet.step(0)
        assert info == {} and obs.shape == (4, 84, 84)
    finally:
        loud.close()
        quiet.close()


def test_envs_part_writes_positive_frame_rates(tmp_path):
    out = tmp_path / "atari.json"
    impls = ["gym-sync", "shoal-process", "shoal-process-noinfo"]
    argv = ["--part", "envs", "--envs", "ALE/Pong-v5", "--num-envs", "2", "--repeats", "1"]
    assert main([*argv, "--seconds", "0.05", "--workers", "2", "--impls", *impls, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    cell = report["envs"]["results"]["ALE/Pong-v5"]["2"]
    assert set(cell) == set(impls)
    assert all(cell[name]["median"] > 0 and len(cell[name]["runs"]) == 1 for name in impls)
    assert cell["shoal-process"]["detail"] == "2 workers"
    ratios = {r["what"]: r["ratio"] for r in report["envs"]["ratios"]}
    expected = cell["shoal-process"]["median"] / cell["gym-sync"]["median"]
    assert ratios["shoal-process / gym-sync, Pong-v5 x2"] == pytest.approx(expected)
    assert "| shoal-process-noinfo |" in out.with_suffix(".md").read_text()
    assert not (tmp_path / "atari_runs").exists()  # the scratch runs are removed


def test_rates_skip_the_first_update():
    marks = [(10.0, 100, 5.0), (12.0, 200, 1.0), (14.0, 300, 1.0)]
    rates = _rates(marks)
    assert rates["fps"] == pytest.approx(4 * 200 / 4.0) and rates["update_share"] == pytest.approx(0.5)
    assert rates["update_seconds"] == pytest.approx(1.0)  # per timed update
    with pytest.raises(ValueError, match="at least 2 updates"):
        _rates(marks[:1])


def test_sb3_game_scores_are_averaged_per_bin_of_env_steps():
    games = [(10, 1.0), (30, 3.0), (250, 5.0)]
    assert _binned(games, 100) == [(100, 2.0), (300, 5.0)]


@pytest.mark.slow
def test_train_part_times_shoal_and_sb3(tmp_path):
    pytest.importorskip("stable_baselines3")
    out = tmp_path / "atari.json"
    argv = ["--part", "train", "--envs", "ALE/Pong-v5", "--train-steps", "96", "--num-steps", "4"]
    assert main([*argv, "--train-rows", "shoal", "sb3", "--torch-threads", "1", "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["train"]["results"]["ALE/Pong-v5"]
    assert set(cells) == {"shoal", "sb3"}
    for cell in cells.values():
        (run,) = cell["runs"]
        assert run["updates"] == 3 and run["timed_steps"] == 2 * 8 * 4
        assert cell["median_fps"] > 0 and 0 < cell["update_share"] < 1
    assert cells["shoal"]["update_gflop"] > 0 and cells["shoal"]["update_seconds"] > 0
    text = out.with_suffix(".md").read_text()
    assert "shoal / sb3, Pong-v5" in text and "these updates alone would cap shoal at" in text


def test_the_curves_final_score_is_the_last_tenth_of_the_budget_not_a_bin_past_it():
    from shoal.bench.atari import late_score

    curve = [(200, 1.0), (900, 2.0), (950, 3.0), (1000, 4.0), (1050, 99.0)]  # 1050: past the budget
    assert late_score(curve, 1000) == 3.5 and late_score([], 1000) is None


def test_curve_seeds_add_to_an_earlier_runs_seeds_and_the_table_shows_each_and_the_mean(
    tmp_path, monkeypatch
):
    import shoal.bench.atari as atari

    def fake(score: float):
        return lambda *a, **k: {"fps": 100.0, "curve": [(900, score), (1000, score)]}

    monkeypatch.setattr(atari, "run_shoal_ppo", fake(8.0))
    monkeypatch.setattr(atari, "run_sb3_ppo", fake(6.0))
    monkeypatch.setattr(atari, "machine", lambda *names: {})  # (importing SB3 and EnvPool for versions: slow)
    monkeypatch.setattr(atari, "plot_curves", lambda *a, **k: None)
    out = tmp_path / "atari.json"
    before = {"env": "ALE/Breakout-v5", "frames": 4000}  # a report from before --curve-seeds: seed 1
    before |= {"shoal": {"fps": 50.0, "curve": [(1000, 4.0)]}, "sb3": {"fps": 50.0, "curve": [(1000, 5.0)]}}
    out.write_text(json.dumps({"curve": before}))
    argv = ["--part", "curve", "--curve-frames", "4000", "--curve-seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    runs = json.loads(out.read_text())["curve"]["runs"]
    assert list(runs) == ["1", "2"] and runs["1"]["shoal"]["fps"] == 50.0 and runs["2"]["sb3"]["fps"] == 100.0
    table = out.with_suffix(".md").read_text()
    assert "seeds 1, 2" in table and "| 6.0 (4.0, 8.0) | 5.5 (5.0, 6.0) |" in table
    # another env or budget starts over
    assert main([*argv[:3], "8000", *argv[4:]]) == 0
    assert list(json.loads(out.read_text())["curve"]["runs"]) == ["2"]

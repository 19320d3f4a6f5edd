"""The command line: bad input is one line and exit code 2; train, eval, plot, resume work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import shoal.envs.process_vector_env as pve
from shoal.cli import main

BAD = [
    (["train", "ppo2", "--env", "CartPole-v1"], "invalid choice: 'ppo2'"),
    (["train", "ppo", "--env", "CartPol-v1"], "did you mean 'CartPole-v1'"),
    (["train", "dqn", "--env", "Pendulum-v1"], "dqn needs discrete actions"),
    (["train", "ppo", "--num-envs", "0"], "num_envs must be a positive integer"),
    (["train", "ppo", "--total-steps", "-5"], "total_steps must be a positive integer"),
    (["train", "ppo", "--num-envs", "x"], "invalid value 'x' for num_envs"),
    (["train", "ppo", "--gama", "0.9"], "did you mean --gamma"),
    (["train", "ppo", "--gamma", "1.5"], "gamma must be in (0, 1]"),
    (["train", "ppo", "--vectorization", "threads"], "vectorization must be"),
    (["train", "ppo", "--device", "cuda"], "no CUDA GPU"),
    (["train", "a2c", "--config", "/nonexistent.yaml"], "does not exist"),
    (["train", "ppo", "--resume", "/nonexistent-run"], "no config.yaml"),
    (["eval", "/nonexistent-run"], "is not a directory"),
    (["train", "ppo", "--backend", "mp", "--strategy", "gossip"], "strategy must be one of sync"),
    (["train", "ppo", "--backend", "cloud"], "backend must be one of local, mp"),
    (["train", "ppo", "--num-workers", "2"], "needs --backend mp"),
    (["train", "ppo", "--backend", "mp", "--num-workers", "0"], "num_workers must be a positive integer"),
    (["train", "a2c", "--strategy", "a3c"], "strategy a3c needs several workers: add --backend mp"),
    (["train", "ppo", "--backend", "mp", "--compress", "zip"], "compress must be one of none, fp16, topk"),
    (["train", "ppo", "--backend", "mp", "--topk-ratio", "0"], "topk_ratio must be in (0, 1]"),
    (["train", "ppo", "--backend", "mp", "--ps-mode", "maybe"], "ps_mode must be sync or async"),
    (["train", "ppo", "--backend", "mp", "--sync-every", "0"], "sync_every must be a positive integer"),
    (["train", "ppo", "--backend", "mp", "--ray-address", "auto"], "ray_address is for --backend ray"),
    (["train", "ppo", "--max-policy-lag", "-1"], "max_policy_lag must be >= 0"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_input_is_one_line_and_exit_code_2_before_anything_starts(argv, message, capsys, monkeypatch):
    def no_workers(*args, **kwargs):
        raise AssertionError("a vector env was started for bad input")

    monkeypatch.setattr(pve.ProcessVectorEnv, "__init__", no_workers)
    with pytest.raises(SystemExit) as exited:
        sys.exit(main(argv))
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("shoal: make_vec")]
    assert len(err) == 1, err
    assert err[0].startswith("shoal: error:") and message in err[0], err[0]


def test_config_file_unknown_key_and_types(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.001\n")
    assert main(["train", "ppo", "--config", str(bad)]) == 2
    assert (
        "unknown setting 'learning_rat' in the config file; did you mean 'learning_rate'?"
        in capsys.readouterr().err
    )
    bad.write_text("num_envs: eight\n")
    assert main(["train", "ppo", "--config", str(bad)]) == 2
    assert "num_envs must be an int" in capsys.readouterr().err


def test_precedence_defaults_preset_file_flags(tmp_path):
    from shoal.algos import PPO
    from shoal.configio import load_config_file, resolve

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("num_steps: 16\nlearning_rate: 0.002\nhidden: [32, 32]\n")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text("num_steps = 16\nlearning_rate = 0.002\nhidden = [32, 32]\n")
    for path in (yaml_file, toml_file):
        file_values = load_config_file(path)
        config = resolve(PPO.config_class, PPO.presets, file_values, {"learning_rate": 0.005, "env": None})
        assert config.num_steps == 16  # file beats preset (32)
        assert config.learning_rate == 0.005  # flag beats file
        assert config.hidden == (32, 32)
        assert config.update_epochs == 20  # the CartPole preset beats the default (4)
        assert config.clip_coef == 0.2  # the default where nobody says otherwise


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_train_eval_plot_resume_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "32", "--run-dir", str(run_dir)]
    done = run_cli(
        "train", "ppo", *common, "--total-steps", "2048", "--checkpoint-every", "512", "--eval-episodes", "2"
    )
    assert done.returncode == 0, done.stderr
    assert "shoal: step 2,048/2,048" in done.stdout  # plain progress lines when not a terminal
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert list((run_dir / "checkpoints").glob("*.safetensors"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {
        "env_steps",
        "wall_time",
        "sps",
        "policy_loss",
        "value_loss",
        "entropy",
        "approx_kl",
        "learning_rate",
    } <= set(rows[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"mean_return", "std_return", "episodes"} <= set(summary)

    evaluated = run_cli("eval", str(run_dir), "--episodes", "3", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["episodes"] == 3 and result["mean_return"] > 0

    resumed = run_cli("train", "ppo", "--resume", str(run_dir), "--total-steps", "3072", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["env_steps"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3072  # no duplicated rows after the resume

    png = tmp_path / "curves.png"
    plotted = run_cli("plot", str(run_dir), "-o", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""A checkpoint is data (issue 15, items 4 and 7): its config is validated like flags, nothing
named in it is imported, its checksum is required and its counters are checked; what it asks
for that this machine lacks (CUDA) or that never ends (1e9 episodes) is one line, not a hang
or a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import shoal
from shoal.cli import main
from shoal.configio import ConfigError
from shoal.run import checkpoint as ckpt

EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("imported")
import gymnasium as gym
Env = gym.make("CartPole-v1").unwrapped.__class__
"""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "ppo"
    agent = shoal.PPO(
        "CartPole-v1",
        num_envs=2,
        num_steps=16,
        total_steps=64,
        eval_episodes=1,
        vectorization="sync",
        run_dir=str(run_dir),
    )
    agent.learn(progress=False)
    return run_dir


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    return run_dir, ckpt.latest(run_dir / "checkpoints")


def forge(index: Path, *, checksum: bool = True, **changes) -> None:
    """Edit the checkpoint's JSON as a forger would: the checksum recomputed (anyone can)."""
    info = json.loads(index.read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            info["config"][key.removeprefix("config.")] = value
        else:
            info[key] = value
    info.pop("json_sha256")
    if checksum:
        info["json_sha256"] = ckpt._digest(info)
    index.write_text(json.dumps(info))


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shoal: error: "), err
    return err


def test_a_checkpoint_naming_a_module_never_imports_it(small_run, tmp_path, monkeypatch, capsys):
    """config.env = 'evil_mod:Env-v0' would make gym.make import evil_mod: shoal eval, shoal.load and
    --resume refuse it in one line, and the module never runs (it would write the marker)."""
    run_dir, index = copy_run(small_run, tmp_path)
    marker = tmp_path / "module-was-imported"
    (tmp_path / "evil_mod.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    forge(index, **{"config.env": "evil_mod:Env-v0"})

    err = one_line_error(["eval", str(run_dir)], capsys)
    assert "names a module to import" in err
    with pytest.raises(ConfigError, match="names a module to import"):
        shoal.load(run_dir)
    err = one_line_error(["train", "ppo", "--resume", str(run_dir), "--quiet"], capsys)
    assert "was trained on 'evil_mod:Env-v0'" in err or "names a module" in err
    config_yaml = run_dir / "config.yaml"  # the run's config.yaml is data too
    config_yaml.write_text(config_yaml.read_text().replace("env: CartPole-v1", "env: evil_mod:Env-v0"))
    assert "names a module to import" in one_line_error(["train", "ppo", "--resume", str(run_dir)], capsys)
    assert not marker.exists()


def test_a_checkpoint_json_without_its_checksum_is_refused(small_run, tmp_path, capsys):
    run_dir, index = copy_run(small_run, tmp_path)
    forge(index, checksum=False, env_steps=10**12)
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        shoal.load(run_dir)
    assert "checksum" in one_line_error(["train", "ppo", "--resume", str(run_dir), "--quiet"], capsys)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"env_steps": 10**12}, "env_steps 1,000,000,000,000 is past the run's total_steps 64"),
        ({"env_steps": 1e12}, "env_steps must be a non-negative integer, got 1000000000000.0"),
        ({"updates": -3}, "updates must be a non-negative integer, got -3"),
        ({"boundary": "2"}, "boundary must be a non-negative integer"),
        ({"boundary": 10**6}, "boundary 1000000 is past env_steps"),
        ({"config.gamma": 2.0}, "gamma must be in (0, 1]"),
        ({"config.eval_episodes": 10**9}, "eval_episodes must be at most 10,000"),
        ({"config.num_envs": "8"}, "num_envs must be an int"),
        ({"config.backdoor": 1}, "no setting 'backdoor'"),
        ({"config.env": "NoSuchEnv-v9"}, "unknown env id 'NoSuchEnv-v9'"),
    ],
)
def test_checkpoint_config_and_counters_are_validated_like_flags(
    small_run, tmp_path, capsys, changes, message
):
    run_dir, index = copy_run(small_run, tmp_path)
    forge(index, **changes)
    with pytest.raises((ConfigError, ckpt.CheckpointError)) as raised:
        shoal.load(run_dir)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert message in one_line_error(["eval", str(run_dir)], capsys)
    if "config.env" not in changes:  # (a changed env is refused earlier, against config.yaml)
        argv = ["train", "ppo", "--resume", str(run_dir), "--quiet"]
        assert message in one_line_error(argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_checkpoint_loads_and_evaluates_on_the_cpu(small_run, tmp_path, capsys):
    """Documented choice: a checkpoint's device is a preference; without a GPU, loading falls back
    to the CPU (an explicit --device / device= that cannot be met is one line)."""
    run_dir, index = copy_run(small_run, tmp_path)
    forge(index, **{"config.device": "cuda"})
    agent = shoal.load(run_dir)
    assert agent.algorithm.device.type == "cpu"
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0, capsys.readouterr().err
    assert "no CUDA GPU" in one_line_error(["eval", str(run_dir), "--device", "cuda"], capsys)


def test_eval_episodes_are_bounded(small_run, capsys):
    assert "--episodes must be an integer in [1, 10,000]" in one_line_error(
        ["eval", str(small_run), "--episodes", "1e9"], capsys
    )
    with pytest.raises(ConfigError, match="eval_episodes must be at most 10,000"):
        shoal.PPO("CartPole-v1", eval_episodes=10**9)


def test_a_loaded_agent_run_dir_is_the_folder_it_was_loaded_from(small_run, tmp_path):
    agent = shoal.load(small_run)
    assert agent.run_dir == small_run.absolute() and agent.run_dir.is_dir()
    index = ckpt.latest(small_run / "checkpoints")
    assert shoal.load(index).run_dir == small_run.absolute()
    saved = tmp_path / "saved"
    agent.save(saved)
    assert shoal.load(saved).run_dir == saved.absolute()


def test_a_checkpoint_from_another_machine_loads(small_run, tmp_path, capsys):
    """Only the values are checked, not this machine: a run of 64 mp workers on a big machine,
    written to a directory that does not exist here, still loads and evaluates."""
    run_dir, index = copy_run(small_run, tmp_path)
    forge(index, **{"config.backend": "mp", "config.num_workers": 64, "config.run_dir": "/nonexistent/x"})
    agent = shoal.load(run_dir)
    assert agent.config.num_workers == 64 and agent.run_dir == run_dir.absolute()
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--episodes", "1"]) == 0, capsys.readouterr().err

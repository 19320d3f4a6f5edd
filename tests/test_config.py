"""The config layer (issue 11): each config class declares and checks its own constraints, so a
new algorithm is a new file; the CLI's help shows what will run; small CLI papercuts."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import shoal
import shoal.envs.process_vector_env as pve
import shoal.launch
from shoal.algos import ALGORITHMS
from shoal.cli import main
from shoal.config import TrainConfig, opt
from shoal.configio import ConfigError, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def nothing_starts(monkeypatch):
    started: list = []

    def no_envs(*args, **kwargs):
        raise AssertionError("a vector env was started")

    def fake_train(algo, config, **kwargs):
        started.append(config)
        return {"mean_return": 1.0, "std_return": 0.0, "episodes": 1}, "runs/fake"

    monkeypatch.setattr(pve.ProcessVectorEnv, "__init__", no_envs)
    monkeypatch.setattr(shoal.launch, "train", fake_train)
    return started


# -- the generic layer names no algorithm ----------------------------------------------------------


def test_configio_and_cli_name_no_algorithm_or_algorithm_field():
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {n for a in ALGORITHMS.values() for n in a.config_class.__dataclass_fields__} - shared
    for path in ("shoal/configio.py", "shoal/cli.py"):
        text = (ROOT / path).read_text()
        named = sorted(n for n in own if re.search(rf"\b{n}\b", text))
        assert not named, f"{path} names algorithm fields {named}"
        algos = sorted(a for a in ALGORITHMS if re.search(rf"['\"]{a}['\"]", text))
        assert not algos, f"{path} names algorithms {algos}"


@dataclass
class SACConfig(TrainConfig):
    """A new algorithm's config, as its own file would declare it."""

    tau: float = opt(0.005, "target smoothing", gt=0, le=1)
    batch_size: int = opt(256, "transitions per step", ge=1)
    buffer_size: int = opt(1_000_000, "replay capacity", ge=1)

    def validate(self, *, explicit: Iterable[str] = ()) -> None:
        super().validate(explicit=explicit)
        if self.batch_size > self.buffer_size:
            raise ConfigError(f"batch_size {self.batch_size} is more than buffer_size {self.buffer_size}")


class FakeSAC:
    name = "sac"
    config_class = SACConfig
    presets = {"Pendulum-v1": {"batch_size": 64}}


def test_a_new_algorithm_is_a_config_class_and_no_edit_to_configio_or_cli(
    monkeypatch, capsys, nothing_starts
):
    monkeypatch.setitem(ALGORITHMS, "sac", FakeSAC)
    assert main(["train", "sac", "--env", "Pendulum-v1", "--tau", "0.01"]) == 0, capsys.readouterr().err
    assert nothing_starts[-1].tau == 0.01 and nothing_starts[-1].batch_size == 64  # preset applied
    for argv, message in (
        (["--tau", "2"], "tau must be in (0, 1]"),
        (["--batch-size", "10", "--buffer-size", "5"], "batch_size 10 is more than buffer_size 5"),
    ):
        capsys.readouterr()
        assert main(["train", "sac", "--env", "Pendulum-v1", *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "sac", "--env", "Pendulum-v1", "--help"])
    assert "(default: 64, Pendulum-v1 preset)" in capsys.readouterr().out


def test_subclass_validate_runs_after_the_base_rules():
    """PPOConfig.validate calls super().validate() first: the field's own bound is reported."""
    with pytest.raises(ConfigError, match="num_envs must be a positive integer"):
        resolve(ALGORITHMS["ppo"].config_class, {}, {}, {"num_minibatches": 10**6, "num_envs": 0})
    with pytest.raises(ConfigError, match="num_minibatches 1000000 is more than"):
        resolve(ALGORITHMS["ppo"].config_class, {}, {}, {"num_minibatches": 10**6})


# -- help ------------------------------------------------------------------------------------------


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


def test_help_shows_the_values_that_will_run_for_the_env_grouped(capsys):
    text = help_text(["train", "ppo", "--env", "CartPole-v1", "--help"], capsys)
    flat = " ".join(text.split())
    assert (
        "--num-steps INT steps per env between updates (rollout length) (default: 32, CartPole-v1 preset)"
        in flat
    )
    assert "Adam learning rate (default: 0.001, CartPole-v1 preset)" in flat
    assert "(default: 100_000, CartPole-v1 preset)" in flat
    assert "Presets ship for: CartPole-v1, Acrobot-v1, Pendulum-v1" in flat
    for title in ("algorithm and learner:", "environments:", "distribution", "run files", "faults:"):
        assert title in text, title
    for block in re.split(r"\n  --", text):  # one default per flag, and no "default: None"
        assert block.count("default:") <= 1, block
    assert "default: None" not in text
    other = " ".join(help_text(["train", "ppo", "--env", "Acrobot-v1", "--help"], capsys).split())
    assert "(default: 256, Acrobot-v1 preset)" in other
    dqn = " ".join(help_text(["train", "dqn", "--env", "MountainCar-v0", "--help"], capsys).split())
    assert "no preset for MountainCar-v0" in dqn and "Adam learning rate (default: 0.0001)" in dqn


def test_bare_shoal_prints_its_usage(capsys):
    assert main([]) == 2
    assert "usage: shoal" in capsys.readouterr().out
    assert main(["train"]) == 2
    assert "{ppo,a2c,dqn,sac,td3,impala,appo}" in capsys.readouterr().out


# -- flags -----------------------------------------------------------------------------------------


def test_int_flags_take_whole_numbers_written_as_floats(nothing_starts, capsys):
    assert main(["train", "ppo", "--total-steps", "1e5", "--num-envs", "4.0"]) == 0, capsys.readouterr().err
    assert nothing_starts[-1].total_steps == 100_000 and nothing_starts[-1].num_envs == 4
    assert main(["train", "ppo", "--total-steps", "1.5e3"]) == 0
    assert nothing_starts[-1].total_steps == 1500
    with pytest.raises(SystemExit):
        main(["train", "ppo", "--total-steps", "1.5"])
    assert "invalid value '1.5' for total_steps" in capsys.readouterr().err


def test_the_final_line_names_an_absolute_run_dir_on_every_backend(
    nothing_starts, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the launcher answers with a relative path (as local runs did)
    for extra in ([], ["--backend", "mp", "--num-workers", "1"]):
        assert main(["train", "ppo", *extra]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.endswith(f"; run in {tmp_path / 'runs' / 'fake'}"), line
        assert "mean greedy return 1.0 +- 0.0 over 1 episodes" in line


def test_an_unknown_flag_suggests_the_flag_meant(capsys):
    for wrong, meant in (("--lr", "--learning-rate"), ("--ne", "--num-envs"), ("--gama", "--gamma")):
        with pytest.raises(SystemExit):
            main(["train", "ppo", wrong, "1"])
        assert f"(did you mean {meant}?)" in capsys.readouterr().err, wrong


# -- observation spaces ----------------------------------------------------------------------------


class OddObsEnv(gym.Env):
    action_space = spaces.Discrete(2)

    def __init__(self, observation_space: spaces.Space) -> None:
        self.observation_space = observation_space


ODD_SPACES = {
    "dict": spaces.Dict({"a": spaces.Box(-1, 1, (2,))}),
    "tuple": spaces.Tuple((spaces.Discrete(2), spaces.Discrete(3))),
    "text": spaces.Text(5),
    "small frames": spaces.Box(0, 255, (10, 10, 3), np.uint8),
    "empty": spaces.Box(-1, 1, (0,)),
}


@pytest.mark.parametrize("kind", ODD_SPACES)
def test_unsupported_observation_spaces_are_one_line_before_any_worker(kind, capsys, nothing_starts):
    space = ODD_SPACES[kind]
    with pytest.raises(ConfigError, match="ppo takes Box, Discrete, MultiDiscrete or MultiBinary") as e:
        shoal.PPO(lambda: OddObsEnv(space))
    assert "\n" not in str(e.value)
    env_id = f"ShoalTest/Odd{kind.title().replace(' ', '')}-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=lambda space=space: OddObsEnv(space))
    assert main(["train", "dqn", "--env", env_id]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dqn takes Box" in err, err
    assert nothing_starts == []


# -- what a run prints -----------------------------------------------------------------------------

TINY = ["--num-envs", "2", "--num-steps", "16", "--total-steps", "64", "--eval-episodes", "1"]


@pytest.mark.slow
def test_train_and_eval_print_one_wording_an_absolute_path_and_quiet_means_quiet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, timeout=120
        )

    done = cli("train", "ppo", *TINY, "--run-dir", "rel/run", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "make_vec" not in done.stderr and "picked" not in done.stderr, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "mean greedy return" in last and last.endswith(f"; run in {tmp_path / 'rel' / 'run'}"), last
    loud = cli("train", "ppo", *TINY, "--run-dir", "rel/run2")
    assert "vectorization='auto' picked" in loud.stderr, loud.stderr
    evaluated = cli("eval", "rel/run", "--episodes", "1")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "ppo on CartPole-v1: mean greedy return" in evaluated.stdout


def test_learn_prints_its_result_and_where_the_run_is(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    agent = shoal.PPO("CartPole-v1", num_envs=2, num_steps=16, eval_episodes=1, vectorization="sync")
    agent.learn(64)
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert "mean greedy return" in out and f"run in {agent.run_dir}" in out
    assert agent.run_dir.is_absolute() and agent.run_dir.is_dir()

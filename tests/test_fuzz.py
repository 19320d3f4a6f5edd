"""Fuzzing the input: random flags, config files and Python keywords (seeded, so every run
checks the same cases). Each case either validates cleanly or ends with exit code 2 and one
line starting "shoal: error:"; never a traceback, never a hang. Nothing trains here but a
few clean cases at the end, for real."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import shoal
import shoal.envs.process_vector_env as pve
import shoal.launch
from shoal.algos import ALGORITHMS
from shoal.cli import main
from shoal.configio import ConfigError, validate

SEED = 20261124
CASE_SECONDS = 10.0  # validation alone; anything slower is a hang
ENVS = [
    "CartPole-v1",
    "Acrobot-v1",
    "Pendulum-v1",
    "MountainCarContinuous-v0",
    "CartPol-v1",
    "",
    "LunarLander-v3",
]
CHOICES = {
    "backend": ["local", "mp", "ray", "cloud", ""],
    "strategy": ["sync", "a3c", "param-avg", "param-server", "gossip"],
    "ps_mode": ["sync", "async", "maybe"],
    "compress": ["none", "fp16", "topk", "zip"],
    "vectorization": ["auto", "sync", "process", "threads"],
    "device": ["auto", "cpu", "cuda", "cuda:0", "tpu"],
    "on_env_error": ["restart", "raise", "ignore"],
    "nan_policy": ["raise", "skip", "zero"],
    "ray_address": ["auto", "127.0.0.1:6379", "none"],
    "env": ENVS,
}
GOOD_INT = ["1", "2", "4", "8", "16", "64"]
BAD_INT = ["0", "-1", "1.5", "abc", "", "1e3", "nan", "true", "1,2", str(10**12), str(10**20), "0x10"]
GOOD_FLOAT = ["0.5", "1e-3", "0.01", "0.99", "1", "0"]
BAD_FLOAT = ["nan", "inf", "-inf", "-1", "2", "abc", "", "1e400", "1,2", "0x1p-2"]
HIDDEN = ["64,64", "32", "", "0", "-1,2", "a,b", "64,,64", "1000000,1000000", "16,16,16"]
GARBAGE = [
    "--gama",
    "--learning-starts",
    "--foo",
    "--num-env",
    "extra",
    "--",
    "-x",
    "--hidden=",
    "--seed=1=2",
]
# Settings that only apply with others, and settings that cannot go together.
COMBOS = [
    ["--strategy", "a3c"],
    ["--backend", "mp", "--num-workers", "1", "--ps-mode", "sync"],
    ["--sync-every", "5"],
    ["--max-policy-lag", "3"],
    ["--compress", "topk", "--topk-ratio", "0.1"],
    ["--backend", "mp", "--num-workers", "2", "--strategy", "param-avg", "--sync-every", "3"],
    ["--backend", "ray", "--ray-gpus-per-worker", "1"],
    ["--env-workers", "4", "--vectorization", "sync"],
    ["--device", "cuda"],
    ["--env", "Pendulum-v1"],
]


class Hang(BaseException):
    """A case that took too long (a BaseException: no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Hang after ``seconds``; any timer already set (pytest-timeout's) is put back."""

    def expire(signum, frame):  # noqa: ANN001, ANN202
        raise Hang(f"no answer within {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, expire)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            left = max(1e-3, old_delay - (time.monotonic() - started))
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


def field_kinds(algo: str) -> dict[str, Any]:
    """Each setting's type without Optional: int, float, bool, str or a tuple."""
    cls = ALGORITHMS[algo].config_class
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        out[f.name] = args[0] if args and typing.get_origin(hints[f.name]) is not tuple else hints[f.name]
    return out


def flag_value(rng: random.Random, name: str, kind: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        return rng.choice([[flag], ["--no-" + flag[2:]], [flag, rng.choice(["yes", "0", "maybe"])]])
    if name == "run_dir":
        return [flag, rng.choice(["", "/proc/1/nope", "runs/x\nx", "none"])]
    if name == "resume":
        return [flag, "/nonexistent-run"]
    if name in CHOICES:
        value = rng.choice(CHOICES[name])
    elif typing.get_origin(kind) is tuple:
        value = rng.choice(HIDDEN)
    elif kind is int:
        value = rng.choice(GOOD_INT if rng.random() < 0.6 else BAD_INT)
    elif kind is float:
        value = rng.choice(GOOD_FLOAT if rng.random() < 0.6 else BAD_FLOAT)
    else:
        value = rng.choice(["x", "", "none"])
    return [f"{flag}={value}"] if value.startswith("-") or rng.random() < 0.3 else [flag, value]


def file_value(rng: random.Random, kind: Any) -> Any:
    """A value for a config file: usually of a plausible type, often not."""
    pool: list[Any] = [
        None,
        True,
        0,
        -3,
        7,
        10**13,
        0.5,
        math.nan,
        math.inf,
        1e-3,
        "1e-3",
        "abc",
        "",
        [64, 64],
        [],
        ["a"],
        [1.5],
        {"a": 1},
    ]
    if kind is int:
        pool += [1, 2, 8, 16]
    elif kind is float:
        pool += [0.1, 0.9, 1.0]
    elif typing.get_origin(kind) is tuple:
        pool += [[32], [16, 16]]
    elif kind is bool:
        pool += [True, False]
    return rng.choice(pool)


def yaml_text(rng: random.Random, algo: str) -> str | bytes:
    kinds = field_kinds(algo)
    roll = rng.random()
    if roll < 0.55:
        data: dict[Any, Any] = {}
        for _ in range(rng.randint(0, 5)):
            name = (
                rng.choice(list(kinds))
                if rng.random() < 0.8
                else rng.choice(["gama", "buffer_size", "ppo", 3])
            )
            if name in CHOICES and rng.random() < 0.7:
                data[name] = rng.choice(CHOICES[name])
            else:
                data[name] = file_value(rng, kinds.get(name))
        if rng.random() < 0.1:
            data["algo"] = rng.choice(list(ALGORITHMS))
        return yaml.safe_dump(data)
    if roll < 0.8:
        return rng.choice(
            [
                "a: [1, 2\n",
                "learning_rate: 0.1: 2\n",
                "\t- x\n",
                "{",
                "num_envs: 8\n  gamma: 0.9\n",
                "seed: !!python/object/apply:os.getpid []\n",
                "&a [*a]\n",
                "num_envs: &x [*x]\n",
                "- 1\n- 2\n",
                "just a string\n",
                "42\n",
                "? [a, b]\n: 1\n",
                "num_envs: 8\nnum_envs: 9\n",
                "learning_rate: 1e-3\nhidden: []\n",
                "gamma: .nan\n",
                "env: " + "x" * 5000 + "\n",
                "[" * 2000,
            ]
        )
    if roll < 0.9:
        return rng.randbytes(rng.randint(1, 400))
    return ""


def toml_text(rng: random.Random, algo: str) -> str | bytes:
    kinds = field_kinds(algo)
    literals = [
        "8",
        "0",
        "-1",
        "1e5",
        "0.5",
        "nan",
        "inf",
        "true",
        '"1e-3"',
        '"abc"',
        "[64, 64]",
        "[]",
        '["a"]',
    ]
    literals += ["{ a = 1 }", "1979-05-27", "[1, 2.5]"]
    if rng.random() < 0.75:
        lines = []
        for _ in range(rng.randint(0, 5)):
            key = rng.choice(list(kinds)) if rng.random() < 0.85 else rng.choice(["gama", "n_step", '"a b"'])
            value = (
                f'"{rng.choice(CHOICES[key])}"'
                if key in CHOICES and rng.random() < 0.7
                else rng.choice(literals)
            )
            lines.append(f"{key} = {value}")
        if rng.random() < 0.15:
            lines.append(rng.choice(["[ppo]", "x = ", "= 3", "a = [1,", "learning_rate = 1 2", "[[x]]"]))
        return "\n".join(lines) + "\n"
    return rng.randbytes(rng.randint(1, 200)) if rng.random() < 0.5 else ""


def cli_case(rng: random.Random, tmp: Path, k: int) -> list[str]:
    algo = rng.choice(list(ALGORITHMS))
    kinds = field_kinds(algo)
    argv = ["train", algo if rng.random() > 0.03 else "ppo2"]
    if rng.random() < 0.5:
        argv += ["--env", rng.choice(ENVS)]
    for name in rng.sample(sorted(kinds), rng.randint(0, 4)):
        if name != "env":
            argv += flag_value(rng, name, kinds[name])
    if rng.random() < 0.35:
        suffix = rng.choice([".yaml", ".yaml", ".yml", ".toml", ".toml", ".json"])
        path = tmp / f"case{k}{suffix}"
        text = toml_text(rng, algo) if suffix == ".toml" else yaml_text(rng, algo)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        argv += ["--config", str(path) if rng.random() > 0.05 else str(tmp / "missing.yaml")]
    if rng.random() < 0.15:
        argv += rng.choice(COMBOS)
    if rng.random() < 0.1:
        argv.append(rng.choice(GARBAGE))
    if rng.random() < 0.04:
        argv += ["--resume", rng.choice(["/nonexistent-run", str(tmp)])]
    return argv


@pytest.fixture
def nothing_trains(monkeypatch):
    """No vector env may start; ``launch.train`` records the configs that reach it."""
    started: list = []

    def no_envs(*args, **kwargs):
        raise AssertionError("a vector env was started during validation")

    def record(algo, config, **kwargs):
        started.append((algo, config))
        return {"mean_return": 0.0, "std_return": 0.0, "episodes": 0}, "run"

    monkeypatch.setattr(pve.ProcessVectorEnv, "__init__", no_envs)
    monkeypatch.setattr(shoal.launch, "train", record)
    return started


def run_cli(argv: list[str]) -> int:
    with deadline(CASE_SECONDS):
        try:
            return main(argv)
        except SystemExit as e:  # argparse's errors exit 2 themselves
            return e.code


def cheap(config: Any) -> bool:
    """A clean config that trains a few hundred steps in about a second."""
    return (
        config.env in ("CartPole-v1", "Acrobot-v1")
        and config.backend == "local"
        and config.num_envs <= 8
        and config.torch_threads <= 2
        and getattr(config, "num_steps", 1) <= 64
        and getattr(config, "update_epochs", 1) * getattr(config, "num_minibatches", 1) <= 40
        and getattr(config, "gradient_steps", 1) <= 8
        and sum(config.hidden) <= 256
    )


def test_random_flags_and_config_files_give_a_clean_run_or_one_line(tmp_path, capsys, nothing_trains):
    rng = random.Random(SEED)
    clean: list[list[str]] = []
    refused = cases = 0
    # 250 cases, and more (up to 600) until 3 clean cheap ones came: which cases are drawn
    # shifts with every setting added, and cheap ones (ppo or a2c, CartPole, local) are rare.
    while cases < 250 or (len(clean) < 3 and cases < 600):
        argv = cli_case(rng, tmp_path, cases)
        cases += 1
        before = len(nothing_trains)
        code = run_cli(argv)
        err = capsys.readouterr().err
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            refused += 1
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("shoal: error: "), (argv, err)
            assert len(nothing_trains) == before, argv  # refused before anything started
        else:
            assert len(nothing_trains) == before + 1, argv
            algo, config = nothing_trains[-1]
            validate(config)  # what reached training is valid
            if cheap(config):
                clean.append(argv)
    assert 0.12 < refused / cases < 0.96 and len(clean) >= 3, (refused, cases, len(clean))  # both sides

    # A few clean cases, trained for real (briefly).
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(shoal.launch, "train", _real_train)
            mp.setattr(pve.ProcessVectorEnv, "__init__", _real_pve_init)
            for k, argv in enumerate(clean[:3]):
                run_dir = tmp_path / f"real{k}"
                short = ["--total-steps", "256", "--eval-episodes", "1", "--log-every", "128", "--quiet"]
                code = main([*argv, *short, "--checkpoint-every", "0", "--run-dir", str(run_dir)])
                assert code == 0, (argv, capsys.readouterr().err)
                assert (run_dir / "summary.json").exists()
    finally:
        torch.set_num_threads(threads)


_real_train = shoal.launch.train
_real_pve_init = pve.ProcessVectorEnv.__init__


def api_kwargs(rng: random.Random, algo: str) -> dict[str, Any]:
    kinds = field_kinds(algo)
    kwargs: dict[str, Any] = {}
    for name in rng.sample(sorted(kinds), rng.randint(0, 4)):
        if name in ("env", "run_dir", "torch_threads"):
            continue
        if name in CHOICES and rng.random() < 0.6:
            kwargs[name] = rng.choice(CHOICES[name])
        else:
            kwargs[name] = file_value(rng, kinds[name])
    if rng.random() < 0.1:
        kwargs[rng.choice(["learning_rat", "buffer_size", "num_steps", "foo"])] = 1
    if rng.random() < 0.1:
        kwargs.update(rng.choice([dict(strategy="a3c"), dict(sync_every=3), dict(compress="fp16")]))
    return kwargs


def test_random_python_keywords_give_an_agent_or_a_config_error(tmp_path):
    rng = random.Random(SEED + 1)
    made = refused = 0
    threads = torch.get_num_threads()
    try:
        for _ in range(160):  # (more settings, more ways to be refused: enough cases for both sides)
            algo = rng.choice(list(ALGORITHMS))
            env = rng.choice(["CartPole-v1", "CartPole-v1", "Pendulum-v1", "CartPol-v1", 5])
            kwargs = api_kwargs(rng, algo)
            with deadline(CASE_SECONDS):
                try:
                    agent = getattr(shoal, algo.upper())(env, run_dir=str(tmp_path / "api"), **kwargs)
                except ValueError as e:  # ConfigError (a ValueError), and only that
                    assert isinstance(e, ConfigError), (algo, env, kwargs, repr(e))
                    assert str(e) and "\n" not in str(e), (algo, env, kwargs, str(e))
                    refused += 1
                else:
                    validate(agent.config)
                    made += 1
    finally:
        torch.set_num_threads(threads)
    assert made >= 10 and refused >= 30, (made, refused)

"""Bad input, case by case: the command line and the Python API refuse it with the same one
line (exit code 2, ``ConfigError``) before anything starts; the combinations shoal allows on
purpose stay allowed."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import yaml

import shoal
import shoal.envs.process_vector_env as pve
import shoal.launch
from shoal.algos import ALGORITHMS
from shoal.cli import main
from shoal.configio import ConfigError, load_config_file, resolve
from shoal.training.trainer import config_dict

MP2 = ["--backend", "mp", "--num-workers", "2"]

# (CLI arguments after `shoal train`, the message, the same settings as Python keywords or None)
REFUSED = [
    # incompatible combinations
    (["dqn", "--env", "Pendulum-v1"], "dqn needs discrete actions but Pendulum-v1 has Box", {}),
    (["sac", "--env", "CartPole-v1"], "sac needs continuous (Box) actions but CartPole-v1", {}),
    (["td3", "--env", "CartPole-v1"], "td3 needs continuous (Box) actions but CartPole-v1", {}),
    (
        ["sac", "--env", "Pendulum-v1", "--batch-size", "100", "--buffer-size", "50"],
        "batch_size 100 is more than buffer_size 50; lower --batch-size",
        dict(batch_size=100, buffer_size=50),
    ),
    (
        ["ppo", "--backend", "mp", "--num-workers", "1", "--ps-mode", "sync"],
        "ps_mode is for --strategy param-server (a3c is always async); drop --ps-mode",
        dict(backend="mp", num_workers=1, ps_mode="sync"),
    ),
    (  # given explicitly, even at its default value
        ["ppo", *MP2, "--strategy", "a3c", "--ps-mode", "async"],
        "ps_mode is for --strategy param-server",
        dict(backend="mp", num_workers=2, strategy="a3c", ps_mode="async"),
    ),
    (
        ["ppo", *MP2, "--sync-every", "5"],
        "sync_every is for --strategy param-avg; drop --sync-every",
        dict(backend="mp", num_workers=2, sync_every=5),
    ),
    (
        ["ppo", *MP2, "--max-policy-lag", "3"],
        "max_policy_lag is for --strategy a3c",
        dict(backend="mp", num_workers=2, max_policy_lag=3),
    ),
    (
        ["ppo", *MP2, "--strategy", "param-server", "--max-policy-lag", "3"],
        "max_policy_lag is for --strategy a3c (param-server applies every gradient)",
        dict(backend="mp", num_workers=2, strategy="param-server", max_policy_lag=3),
    ),
    (
        ["ppo", "--compress", "fp16"],
        "compress fp16 is for several workers (--backend mp or ray)",
        dict(compress="fp16"),
    ),
    (
        ["ppo", *MP2, "--topk-ratio", "0.1"],
        "topk_ratio is for --compress topk; drop --topk-ratio",
        dict(backend="mp", num_workers=2, topk_ratio=0.1),
    ),
    (
        ["ppo", *MP2, "--ray-cpus-per-worker", "2"],
        "ray_cpus_per_worker is for --backend ray",
        dict(backend="mp", num_workers=2, ray_cpus_per_worker=2),
    ),
    (
        ["ppo", "--vectorization", "sync", "--env-workers", "2"],
        "env_workers is for --vectorization process (or auto)",
        dict(vectorization="sync", env_workers=2),
    ),
    (["ppo", "--num-workers", "2"], "num_workers 2 needs --backend mp or ray", dict(num_workers=2)),
    (["a2c", "--strategy", "a3c"], "strategy a3c needs several workers", dict(strategy="a3c")),
    (
        ["ppo", "--backend", "mp", "--num-workers", str(4 * (os.cpu_count() or 1) + 1)],
        "starts that many processes on this machine",
        dict(backend="mp", num_workers=4 * (os.cpu_count() or 1) + 1),
    ),
    (
        ["ppo", "--num-minibatches", "300"],
        "num_minibatches 300 is more than the 256 transitions of a rollout (num_steps 32 x num_envs 8)",
        dict(num_minibatches=300),
    ),
    (
        ["dqn", "--batch-size", "100", "--buffer-size", "50"],
        "batch_size 100 is more than buffer_size 50",
        dict(batch_size=100, buffer_size=50),
    ),
    # values out of range, or that would exhaust the machine
    (
        ["ppo", "--learning-rate", "nan"],
        "learning_rate must be a finite number, got nan",
        dict(learning_rate=float("nan")),
    ),
    (["ppo", "--gamma", "inf"], "gamma must be a finite number, got inf", dict(gamma=float("inf"))),
    (
        ["ppo", "--step-timeout", "inf"],
        "step_timeout must be a finite number",
        dict(step_timeout=float("inf")),
    ),
    (["ppo", "--target-kl", "0"], "target_kl must be > 0", dict(target_kl=0.0)),
    (["a2c", "--rms-alpha", "1"], "rms_alpha must be in [0, 1)", dict(rms_alpha=1.0)),
    (["dqn", "--tau", "0"], "tau must be in (0, 1]", dict(tau=0.0)),
    (["ppo", "--log-std-init", "100"], "log_std_init must be in [-20, 20]", dict(log_std_init=100.0)),
    (["ppo", "--hidden", "64,0"], "hidden layer sizes must be positive integers", dict(hidden=[64, 0])),
    (["ppo", "--max-restarts", "-1"], "max_restarts must be >= 0", dict(max_restarts=-1)),
    (["ppo", "--env-workers", "0"], "env_workers must be a positive integer", dict(env_workers=0)),
    (["ppo", "--env-workers", "9"], "env_workers 9 is more than num_envs 8", dict(env_workers=9)),
    (["ppo", "--torch-threads", "1000"], "torch_threads must be at most 256", dict(torch_threads=1000)),
    (["ppo", "--num-envs", "1000000"], "num_envs must be at most 10,000", dict(num_envs=10**6)),
    (["ppo", "--seed", str(10**16)], "seed must be at most 1e+15", dict(seed=10**16)),
    (
        ["dqn", "--buffer-size", str(10**12)],
        "sized by buffer_size) but this machine has",
        dict(buffer_size=10**12),
    ),
    (
        ["ppo", "--hidden", "1000000,1000000"],
        "sized by hidden) but this machine has",
        dict(hidden=[10**6] * 2),
    ),
    (["ppo", "--device", "cuda:x"], "device must be auto, cpu, cuda or cuda:N", dict(device="cuda:x")),
    # normalisation where it means nothing
    (
        ["ppo", "--env", "FrozenLake-v1", "--normalize-obs"],
        "normalize_obs is for vectors of numbers (a float Box); FrozenLake-v1 has Discrete observations",
        dict(normalize_obs=True),
    ),
    (["ppo", "--obs-clip", "5"], "obs_clip is for --normalize-obs; drop --obs-clip", dict(obs_clip=5.0)),
    (
        ["a2c", "--env", "Pendulum-v1", "--no-normalize-reward", "--reward-clip", "5"],
        "reward_clip is for --normalize-reward; drop --reward-clip",
        dict(normalize_reward=False, reward_clip=5.0),
    ),
    (["ppo", "--env", "Pendulum-v1", "--obs-clip", "0"], "obs_clip must be > 0", dict(obs_clip=0.0)),
    (["ppo", "--env", "CartPol-v1"], "unknown env id 'CartPol-v1'; did you mean 'CartPole-v1'?", {}),
]
if not torch.cuda.is_available():
    REFUSED.append(
        (["ppo", "--device", "cuda"], "no CUDA GPU is available; use --device cpu", dict(device="cuda"))
    )
    if importlib.util.find_spec("ray") is not None:
        REFUSED.append(
            (
                ["ppo", "--backend", "ray", "--ray-gpus-per-worker", "1"],
                "ray_gpus_per_worker 1 asks for GPUs, but the local Ray started here would have none",
                dict(backend="ray", ray_gpus_per_worker=1),
            )
        )


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail if a vector env or a training run starts; record the configs that got through."""
    started: list = []

    def no_envs(*args, **kwargs):
        raise AssertionError("a vector env was started")

    def fake_train(algo, config, **kwargs):
        started.append(config)
        return {"mean_return": 0.0, "std_return": 0.0, "episodes": 0}, "run"

    monkeypatch.setattr(pve.ProcessVectorEnv, "__init__", no_envs)
    monkeypatch.setattr(shoal.launch, "train", fake_train)
    return started


def cli_error(argv: list[str], capsys) -> str:
    """The one line the CLI prints for bad input (and it exits 2)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: "), err
    return lines[0].removeprefix("shoal: error: ")


@pytest.mark.parametrize(("argv", "message", "kwargs"), REFUSED, ids=[" ".join(c[0]) for c in REFUSED])
def test_refused_by_cli_and_api_with_the_same_line(argv, message, kwargs, capsys, nothing_starts):
    line = cli_error(["train", *argv], capsys)
    assert message in line
    if kwargs is not None:
        env = argv[argv.index("--env") + 1] if "--env" in argv else "CartPole-v1"
        with pytest.raises(ConfigError) as raised:
            getattr(shoal, argv[0].upper())(env, **kwargs)
        # The same line (the memory a machine has available moves between the two calls).
        assert str(raised.value).split("this machine has")[0] == line.split("this machine has")[0]
    assert nothing_starts == []


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(learning_rate="1e-3"),  # a string is a caller's bug in Python (files may say 1e-3)
        dict(anneal_lr=1),
        dict(num_envs=True),
        dict(num_envs=8.5),
        dict(hidden=64),
        dict(hidden=[]),
        dict(seed=None),
        dict(learning_rat=1e-3),
        dict(buffer_size=1000),
    ],
)
def test_api_types_and_unknown_keywords(kwargs):
    if kwargs in (dict(hidden=[]),):  # allowed: no hidden layer is a linear policy
        assert shoal.PPO("CartPole-v1", **kwargs).config.hidden == ()
        return
    with pytest.raises(ConfigError) as raised:
        shoal.PPO("CartPole-v1", **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    if "learning_rat" in kwargs:
        assert isinstance(raised.value, TypeError)  # what Python raises for an unknown keyword
        assert message == "ppo has no setting 'learning_rat'; did you mean 'learning_rate'?"
    elif "buffer_size" in kwargs:
        assert message == "ppo has no setting 'buffer_size'; it is a setting of dqn, sac and td3 only"
    else:
        assert message.startswith(next(iter(kwargs)) + " ")


def test_api_learn_and_env_arguments():
    with pytest.raises(ConfigError, match="env must be a gymnasium env id or a function"):
        shoal.PPO(5)
    with pytest.raises(ConfigError, match="needs a registered env id"):
        shoal.PPO(lambda: None, backend="mp", num_workers=2)
    agent = shoal.PPO("CartPole-v1", num_envs=2)
    for bad in (0, -5, 1.5, "100", float("nan"), True):
        with pytest.raises(ConfigError, match="total_steps must be a positive integer"):
            agent.learn(bad)


def test_unknown_flags_name_the_algorithm_they_belong_to(capsys):
    assert "(--learning-starts is a setting of dqn, sac and td3 only)" in cli_error(
        ["train", "ppo", "--learning-starts", "5"], capsys
    )
    assert "(did you mean --learning-rate?)" in cli_error(["train", "ppo", "--lerning-rate", "1"], capsys)


def test_config_files(tmp_path, capsys, nothing_starts):
    def with_file(name: str, text: str | bytes, algo: str = "ppo") -> list[str]:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["train", algo, "--config", str(path)]

    refused = {
        ("bad.yaml", "a: [1, 2\n"): "cannot read config file",
        ("bin.yaml", bytes(range(256))): "cannot read config file",
        ("list.yaml", "- 1\n- 2\n"): "must hold key: value settings, got list",
        ("scalar.yaml", "0\n"): "must hold key: value settings, got int",
        ("nested.yaml", "ppo:\n  learning_rate: 0.1\n"): "settings go at the top level, not under 'ppo'",
        ("nan.yaml", "learning_rate: .nan\n"): "learning_rate must be a finite number",
        ("bool.yaml", "anneal_lr: 1\n"): "anneal_lr must be true or false, got 1",
        ("empty_value.yaml", "num_envs:\n"): "num_envs cannot be empty",
        ("float_int.toml", "total_steps = 1e5\n"): "total_steps must be an int, got 100000.0 (write 100000)",
        ("str.toml", 'gamma = "high"\n'): "gamma must be a float, got 'high'",
        ("other.yaml", "buffer_size: 10\n"): "'buffer_size' in the config file; it is a setting of dqn, sac",
        ("dqn.yaml", "algo: dqn\nlearning_rate: 0.001\n"): "is for 'dqn', not ppo",
        ("unsafe.yaml", "seed: !!python/object/apply:os.getpid []\n"): "cannot read config file",
        ("conf.json", "{}"): "must end in .yaml, .yml or .toml",
    }
    for (name, text), message in refused.items():
        assert message in cli_error(with_file(name, text), capsys), name
    assert nothing_starts == []

    # Accepted: YAML reads 1e-3 as a string, which parses as on the command line; no hidden
    # layer (a linear model); an empty file.
    for name, text in (("ok.yaml", "learning_rate: 1e-3\nhidden: []\n"), ("empty.yaml", "")):
        assert main(with_file(name, text)) == 0
    assert nothing_starts[0].learning_rate == 0.001 and nothing_starts[0].hidden == ()


def test_a_saved_config_round_trips_and_one_worker_runs_every_strategy(tmp_path, capsys, nothing_starts):
    """Allowed on purpose: a saved config.yaml lists every default (ps_mode, sync_every, ...), and
    every strategy runs with one worker on mp or ray: the baseline of ``shoal bench scaling``."""
    algo = ALGORITHMS["ppo"]
    for strategy, extra in (
        ("sync", {}),
        ("a3c", {"max_policy_lag": 3}),
        ("param-avg", {"sync_every": 5}),
        ("param-server", {"ps_mode": "sync", "compress": "topk", "topk_ratio": 0.1}),
    ):
        config = resolve(
            algo.config_class, algo.presets, {}, dict(backend="mp", num_workers=1, strategy=strategy, **extra)
        )
        saved = tmp_path / f"{strategy}.yaml"
        saved.write_text(yaml.safe_dump({"algo": "ppo", **config_dict(config)}))
        assert main(["train", "ppo", "--config", str(saved)]) == 0, capsys.readouterr().err
        assert nothing_starts[-1] == config
        assert load_config_file(saved)["algo"] == "ppo"


def test_resume_keeps_what_the_checkpoint_is_shaped_by(tmp_path, capsys, nothing_starts):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"algo": "ppo", "env": "CartPole-v1", "hidden": [64, 64]})
    )
    (run / "checkpoints" / "ckpt-000000000128.json").write_text("{}")
    line = cli_error(["train", "ppo", "--resume", str(run), "--hidden", "32,32"], capsys)
    assert line == (
        f"--resume {run}: hidden (32, 32) differs from the run's (64, 64), which its checkpoint needs;"
        " drop --hidden"
    )
    assert "that run trained 'ppo', not dqn" in cli_error(["train", "dqn", "--resume", str(run)], capsys)


def test_run_dir_that_is_a_file(tmp_path, capsys, nothing_starts):
    afile = tmp_path / "f"
    afile.write_text("")
    assert "exists and is not a directory" in cli_error(["train", "ppo", "--run-dir", str(afile)], capsys)


def test_dqn_with_n_step_returns_and_no_warm_up_trains(tmp_path):
    """Valid settings that crashed: the first update came before any n-step transition was stored."""
    agent = shoal.DQN(
        "CartPole-v1",
        learning_starts=0,
        n_step=3,
        train_freq=1,
        gradient_steps=1,
        batch_size=8,
        hidden=[16],
        num_envs=1,
        run_dir=str(tmp_path),
        eval_episodes=1,
    )
    agent.learn(64, progress=False)
    assert agent.summary["env_steps"] == 64

"""Checkpoints: safetensors + JSON, atomic, verified, and never executed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import shoal
from shoal.run import checkpoint as ckpt


def test_roundtrip_and_latest(tmp_path):
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    ckpt.save(tmp_path, 10, a, {"note": "first"})
    ckpt.save(tmp_path, 20, {"w": a["w"] * 2}, {"note": "second"})
    assert ckpt.latest(tmp_path).name == "ckpt-000000000020.json"
    tensors, meta = ckpt.load(ckpt.latest(tmp_path))
    np.testing.assert_array_equal(tensors["w"], a["w"] * 2)
    assert meta["note"] == "second" and meta["env_steps"] == 20
    assert not list(tmp_path.glob("*.tmp"))  # temporary files were renamed into place


def test_corrupted_truncated_and_foreign_files_are_refused(tmp_path):
    index = ckpt.save(tmp_path, 1, {"w": np.ones(1000, dtype=np.float32)}, {})
    weights = index.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupted or truncated"):
        ckpt.load(index)
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(ckpt.CheckpointError, match="corrupted or truncated"):
        ckpt.load(index)
    foreign = tmp_path / "other.json"
    foreign.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ckpt.CheckpointError, match="not a shoal checkpoint"):
        ckpt.load(foreign)
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x80\x04\x95 pickle bytes")
    with pytest.raises(ckpt.CheckpointError, match="not a readable shoal checkpoint"):
        ckpt.load(junk)
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load(empty)


def test_agent_save_load_act(tmp_path):
    agent = shoal.PPO(
        "CartPole-v1",
        seed=3,
        total_steps=1024,
        num_envs=4,
        num_steps=32,
        run_dir=str(tmp_path / "run"),
        eval_episodes=1,
    )
    agent.learn(progress=False)
    path = agent.save(tmp_path / "saved")
    assert path.suffix == ".json" and path.with_suffix(".safetensors").exists()
    assert b"pickle" not in path.read_bytes()
    loaded = shoal.load(tmp_path / "saved")
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(agent.act(obs), loaded.act(obs))
    assert loaded.act(obs[0]).shape == ()  # a single observation gives a single action
    with pytest.raises(TypeError, match="did you mean 'learning_rate'"):
        shoal.PPO("CartPole-v1", learning_rat=1e-3)


def test_custom_env_by_callable(tmp_path):
    import gymnasium as gym

    def make_pendulum() -> gym.Env:
        return gym.make("Pendulum-v1", g=9.0)

    agent = shoal.A2C(
        make_pendulum, seed=0, total_steps=400, num_envs=2, run_dir=str(tmp_path), eval_episodes=1
    )
    agent.learn(progress=False)
    assert agent.summary["episodes"] == 1
    action = agent.act(np.zeros(3, dtype=np.float32))
    assert action.shape == (1,) and -2.0 <= action[0] <= 2.0  # clipped to the Box bounds
    loaded = shoal.load(tmp_path, env=make_pendulum)
    np.testing.assert_array_equal(
        loaded.act(np.ones(3, dtype=np.float32)), agent.act(np.ones(3, dtype=np.float32))
    )


def test_tensor_files_are_safetensors_of_every_dtype_and_shape(tmp_path):
    """shoal writes the safetensors format itself (from the arrays' memory, into its own file)."""
    from safetensors.numpy import load, load_file, save

    rng = np.random.default_rng(0)
    arrays = {
        f"{name}/{shape}": (rng.normal(size=shape) * 100).astype(name)
        for name in ckpt.SAFETENSORS_DTYPES
        for shape in [(0,), (1,), (3,), (2, 3, 4)]
    }
    arrays["strided"] = np.arange(20, dtype=np.float32)[::2]  # not contiguous: copied
    path = ckpt.save(tmp_path, 1, arrays, {})
    theirs = load(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
    for read in (load_file(str(path.with_suffix(".safetensors"))), ckpt.load(path)[0]):
        assert read.keys() == arrays.keys()
        for key, value in arrays.items():
            assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
            np.testing.assert_array_equal(read[key], value)
            np.testing.assert_array_equal(read[key], theirs[key])

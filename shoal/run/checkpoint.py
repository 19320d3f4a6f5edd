"""Checkpoints: tensors in a safetensors file, everything else in JSON. Never a pickle.

A checkpoint is two files, ``ckpt-<steps>.safetensors`` and ``ckpt-<steps>.json``. Both
are written to a temporary name, fsynced and renamed into place, the JSON last, so a crash
mid-save leaves the previous checkpoint whole. The JSON records the sha256 of the tensor
file and of its own values; loading checks both, so a truncated or corrupted file is
refused with a clear message. Loading parses JSON and safetensors only: no pickle, no code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

FORMAT = "shoal-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or not shoal's."""


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old file or the new, never half."""
    _write_atomic(Path(path), lambda p: p.write_text(text))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(directory: str | Path, env_steps: int, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write checkpoint ``ckpt-<env_steps>``; return the path of its JSON file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"ckpt-{env_steps:012d}"
    weights = directory / f"{stem}.safetensors"
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    _write_atomic(weights, lambda p: save_file(arrays, str(p)))
    info = {
        "format": FORMAT,
        "env_steps": env_steps,
        "weights": weights.name,
        "sha256": sha256(weights),
        **meta,
    }
    info["json_sha256"] = _digest(info)  # the JSON holds state too (optimizer steps, RNGs): checked
    index = directory / f"{stem}.json"
    _write_atomic(index, lambda p: p.write_text(json.dumps(info, indent=1)))
    return index


def _digest(info: dict[str, Any]) -> str:
    """sha256 of the JSON values, as they read back (tuples become lists), in a fixed key order."""
    values = json.loads(json.dumps({k: v for k, v in info.items() if k != "json_sha256"}))
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint's JSON file in ``directory``, or None."""
    found = sorted(Path(directory).glob("ckpt-*.json"))
    return found[-1] if found else None


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint (its JSON file, or a run/checkpoint directory: the latest one)."""
    path = Path(path)
    if path.is_dir():
        found = latest(path / "checkpoints") or latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        path = found
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable shoal checkpoint ({e})") from None
    found = info.get("format") if isinstance(info, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{path} is not a shoal checkpoint (format {found!r}, expected {FORMAT!r})")
    if info.get("json_sha256") != _digest(info):  # required: a JSON without one is refused
        raise CheckpointError(f"{path} is corrupted (checksum mismatch)")
    name, digest = info.get("weights"), info.get("sha256")
    if not (isinstance(name, str) and isinstance(digest, str)) or name != Path(name).name or not name:
        raise CheckpointError(f"{path} is damaged: no valid 'weights' file name and 'sha256' in it")
    weights = path.with_name(name)  # a bare file name: a checkpoint reads nothing outside its folder
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    if sha256(weights) != digest:
        raise CheckpointError(f"{weights} is corrupted or truncated (checksum mismatch)")
    try:
        tensors = load_file(str(weights))  # safetensors: raw arrays, nothing to execute
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} cannot be read: {' '.join(str(e).split())}") from None
    return tensors, info


RUN_KEYS = ("algo", "config", "optimizers", "extra", "updates", "boundary", "env_steps")


def check_run(meta: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that is shoal's format but not a training run's (e.g. other metadata)."""
    missing = [k for k in RUN_KEYS if k not in meta]
    if missing or not isinstance(meta["config"], dict) or not isinstance(meta["config"].get("env"), str):
        lacks = ", ".join(missing) or "config with an env"
        raise CheckpointError(f"{path} is not a checkpoint of a shoal run (no {lacks} in it)")


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_module(prefix: str, module: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    state = {
        k[len(prefix) + 1 :]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(prefix + "/")
    }
    module.load_state_dict(state)


def optimizer_state(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, np.ndarray], dict]:
    """An optimizer's state split into arrays (per-parameter tensors) and JSON (the rest)."""
    state = optimizer.state_dict()
    arrays, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                arrays[f"{prefix}/{idx}/{key}"] = value.detach().cpu().numpy()
            else:
                scalars[f"{idx}/{key}"] = value
    return arrays, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(
    prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, np.ndarray], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "/"):
            idx, key = name[len(prefix) + 1 :].split("/", 1)
            state.setdefault(int(idx), {})[key] = torch.from_numpy(value)
    for name, value in meta["scalars"].items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

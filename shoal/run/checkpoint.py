"""Checkpoints: tensors in a safetensors file, everything else in JSON. Never a pickle.

A checkpoint is ``ckpt-<steps>.safetensors`` and ``ckpt-<steps>.json``, and, for the newest
checkpoint only, ``ckpt-<steps>.heavy.safetensors``: the arrays under a ``heavy/`` key
segment (a DQN replay buffer), which would otherwise be copied into every checkpoint.
Each file is written to a fresh temporary name in the same directory (created
exclusively, so a link planted there redirects nothing), fsynced and renamed into place,
the JSON last, so a crash mid-save leaves the previous checkpoint whole. After the JSON,
older checkpoints lose their heavy file, and all but the newest ``keep`` are deleted.

The JSON records the sha256 of the tensor files and of its own values; loading checks
them, so a truncated or corrupted file is refused with a clear message. An older
checkpoint whose heavy arrays were pruned still loads (its weights can still be read),
but :func:`check_run` refuses to resume from it. Loading parses JSON and safetensors only.

With ``--eval-every``, the best-scoring weights so far are kept beside the latest, in
``checkpoints/best/`` (:func:`save_best`): one checkpoint written the same way, without its
heavy arrays (it is for acting, not for resuming), which pruning never touches.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.numpy import load_file

FORMAT = "shoal-checkpoint-1"
HEAVY = "heavy"  # a key segment: ``extra/heavy/replay/obs`` is stored in the newest checkpoint only
PRUNED = "heavy_pruned"  # set by load() on an older checkpoint: the newest one's path


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or not shoal's."""


class RunWriteError(RuntimeError):
    """A run file could not be written (a full disk): one line, exit 1, older files kept."""


def is_heavy(key: str) -> bool:
    """Whether array ``key`` is kept in the newest checkpoint only (a ``heavy`` path segment)."""
    return HEAVY in key.split("/")


def _write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace ``path`` by what ``write`` writes, through an exclusively created temporary file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        why = os.strerror(e.errno) if e.errno else str(e)
        code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
        raise RunWriteError(f"cannot write {path}: {why}{code}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old file or the new, never half."""
    _write_atomic(Path(path), lambda f: f.write(text.encode()))


SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "float16": "F16",
    "uint32": "U32", "int32": "I32", "float32": "F32", "uint64": "U64", "int64": "I64", "float64": "F64",
}  # fmt: skip


def _write_tensors(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` in the safetensors format, written from the arrays' own memory into ``f``.

    safetensors' ``save`` would first build the whole file in memory (a replay buffer of
    gigabytes, twice), and its ``save_file`` opens a path, following a link planted there.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, array in arrays.items():
        if array.dtype.name not in SAFETENSORS_DTYPES or array.dtype.byteorder == ">":
            raise ValueError(f"array {name!r} of dtype {array.dtype} cannot be saved (safetensors)")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it: the data starts 8-byte aligned
    f.write(len(text).to_bytes(8, "little") + text)
    for array in arrays.values():
        f.write(np.ascontiguousarray(array).data)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(
    directory: str | Path,
    env_steps: int,
    tensors: dict[str, np.ndarray],
    meta: dict[str, Any],
    *,
    keep: int = 0,
) -> Path:
    """Write checkpoint ``ckpt-<env_steps>``, prune older ones (``keep``: the newest N; 0: all).

    Return the path of its JSON file. A failed write (a full disk) raises
    :class:`RunWriteError`, leaving the previous checkpoints as they were.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"ckpt-{env_steps:012d}"
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    heavy = {k: arrays.pop(k) for k in [k for k in arrays if is_heavy(k)]}
    info: dict[str, Any] = {"format": FORMAT, "env_steps": env_steps}
    try:
        weights = directory / f"{stem}.safetensors"
        _write_atomic(weights, lambda f: _write_tensors(f, arrays))
        info.update(weights=weights.name, sha256=sha256(weights))
        if heavy:
            heavy_file = directory / f"{stem}.{HEAVY}.safetensors"
            _write_atomic(heavy_file, lambda f: _write_tensors(f, heavy))
            info.update(heavy=heavy_file.name, heavy_sha256=sha256(heavy_file))
        info.update(meta)
        info["json_sha256"] = _digest(info)  # the JSON holds state too (optimizer steps, RNGs): checked
        index = directory / f"{stem}.json"
        _write_atomic(index, lambda f: f.write(json.dumps(info, indent=1).encode()))
    except RunWriteError as e:
        kept = latest(directory)
        raise RunWriteError(
            f"checkpoint at env step {env_steps:,} not saved: {e}; "
            + (f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint")
        ) from None
    prune(directory, keep)
    return index


def prune(directory: str | Path, keep: int = 0) -> None:
    """Delete all but the newest ``keep`` checkpoints (0: none), the heavy files of all but the
    newest, and what crashed saves left (temporary files, tensor files without their JSON)."""
    directory = Path(directory)
    indexes = sorted(directory.glob("ckpt-*.json"))
    stems = {p.stem for p in indexes}
    old = indexes[:-keep] if keep > 0 else []
    for index in old:
        index.unlink(missing_ok=True)  # the JSON first: a crash here leaves orphans, never a broken one
    live = stems - {p.stem for p in old}
    newest = indexes[-1].stem if indexes else None
    for path in directory.glob("ckpt-*.safetensors"):
        stem = path.name.split(".")[0]
        if stem not in live or (path.name.endswith(f".{HEAVY}.safetensors") and stem != newest):
            path.unlink(missing_ok=True)
    for path in directory.glob(".ckpt-*.tmp"):  # one writer per run directory: these are debris
        path.unlink(missing_ok=True)


BEST = "best"  # checkpoints/best/: the best-scoring checkpoint of the periodic evaluations


def save_best(
    directory: str | Path, env_steps: int, tensors: dict[str, np.ndarray], meta: dict[str, Any]
) -> Path:
    """Replace the best checkpoint in ``directory/best`` (written as :func:`save` writes, then the
    previous best is deleted); its heavy arrays are left out: a best checkpoint is for acting."""
    light = {k: v for k, v in tensors.items() if not is_heavy(k)}
    return save(Path(directory) / BEST, env_steps, light, meta, keep=1)


def best(run_dir: str | Path) -> Path | None:
    """The best checkpoint's JSON file of a run directory, or None."""
    return latest(Path(run_dir) / "checkpoints" / BEST)


def _digest(info: dict[str, Any]) -> str:
    """sha256 of the JSON values, as they read back (tuples become lists), in a fixed key order."""
    values = json.loads(json.dumps({k: v for k, v in info.items() if k != "json_sha256"}))
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint's JSON file in ``directory``, or None."""
    found = sorted(Path(directory).glob("ckpt-*.json"))
    return found[-1] if found else None


def resolve(path: str | Path) -> Path:
    """A checkpoint's JSON file, given it or a run/checkpoint directory (then: the latest one)."""
    path = Path(path)
    if path.is_dir():
        found = latest(path / "checkpoints") or latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        path = found
    return path


def load(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint (its JSON file, or a run/checkpoint directory: the latest one)."""
    path = resolve(path)
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
    tensors = _read_tensors(path.with_name(name), digest)  # a bare name: nothing outside its folder
    if "heavy" in info:
        heavy, heavy_digest = info["heavy"], info.get("heavy_sha256")
        if not (isinstance(heavy, str) and isinstance(heavy_digest, str)) or heavy != Path(heavy).name:
            raise CheckpointError(f"{path} is damaged: no valid 'heavy' file name and 'heavy_sha256' in it")
        if path.with_name(heavy).is_file():
            tensors.update(_read_tensors(path.with_name(heavy), heavy_digest))
        else:  # an older checkpoint: its weights can be read, a resume is refused (check_run)
            info[PRUNED] = str(latest(path.parent))
    return tensors, info


def _read_tensors(weights: Path, digest: str) -> dict[str, np.ndarray]:
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing")
    if sha256(weights) != digest:
        raise CheckpointError(f"{weights} is corrupted or truncated (checksum mismatch)")
    try:
        return load_file(str(weights))  # safetensors: raw arrays, nothing to execute
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} cannot be read: {' '.join(str(e).split())}") from None


RUN_KEYS = ("algo", "config", "optimizers", "extra", "updates", "boundary", "env_steps")


def check_run(meta: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that cannot restore a training run: shoal's format but not a run's
    (e.g. other metadata), or an older checkpoint whose heavy arrays were pruned."""
    missing = [k for k in RUN_KEYS if k not in meta]
    if missing or not isinstance(meta["config"], dict) or not isinstance(meta["config"].get("env"), str):
        lacks = ", ".join(missing) or "config with an env"
        raise CheckpointError(f"{path} is not a checkpoint of a shoal run (no {lacks} in it)")
    if PRUNED in meta:
        raise CheckpointError(
            f"{path} is an older checkpoint: its heavy arrays (a replay buffer) were pruned, only"
            f" the newest checkpoint keeps them; resume from the newest, {meta[PRUNED]}"
        )


def under(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays whose key starts with ``prefix/``, keyed by the rest."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_module(prefix: str, module: torch.nn.Module, tensors: dict[str, np.ndarray]) -> None:
    module.load_state_dict({k: torch.from_numpy(v) for k, v in under(tensors, prefix).items()})


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
    for name, value in under(tensors, prefix).items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = torch.from_numpy(value)
    for name, value in meta["scalars"].items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

"""Run directories: one run per directory, claimed before anything is written to it.

A run directory is *claimed* by creating its marker file ``.shoal-run`` exclusively
(``O_CREAT|O_EXCL``): of two processes claiming one directory, exactly one succeeds, so
two runs never share a directory, and a new run never truncates an old one's metrics or
mixes its checkpoints with the old one's. A default name that is taken (two runs started
in the same second) becomes ``<name>-2``, ``<name>-3``...; an explicit one is refused.

Who claims: the process that starts the run. ``backend=local``: the trainer. mp and ray:
the launcher, once, before any rank starts; the ranks (and a rebuilt group) then only
*open* the directory, as a resume does.

Scratch directories (``shoal-group-<pid>-XXXX`` in the temp dir) carry their owner's pid,
so the ones a SIGKILLed launcher left behind can be told apart and removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from shoal.configio import ConfigError

MARKER = ".shoal-run"  # its presence: this directory holds (or held) a shoal run
RUN_FILES = (MARKER, "config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
MAX_SUFFIX = 1000  # <name>-2 ... <name>-1000: past that, something else is wrong
SCRATCH_PREFIX = "shoal-group"


class RunDirError(ConfigError):
    """The run directory is another run's: refused before anything is written (exit 2)."""


def _holds_a_run(path: Path) -> list[str]:
    """The run files in ``path`` (a link counts: it may point anywhere)."""
    return [name for name in RUN_FILES if os.path.lexists(path / name)]


def _claim(path: Path) -> bool:
    """Claim ``path`` for this run; False when it is another run's."""
    path.mkdir(parents=True, exist_ok=True)
    if _holds_a_run(path):
        return False
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path / MARKER, flags, 0o644)
    except FileExistsError:  # another process claimed it between the check and here
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"pid {os.getpid()} host {socket.gethostname()} time {time.time():.6f}\n")
    return True


def claim_run_dir(path: str | Path, *, unique: bool = False) -> Path:
    """Make ``path`` this run's own directory and return it.

    ``unique=True`` (a default name): if ``path`` is taken, the first free ``path-2``,
    ``path-3``... is claimed instead. Otherwise (a name the user chose) a directory that
    holds a run is refused with :class:`RunDirError`, in one line, before anything is written.
    """
    base = Path(path)
    for n in range(1, MAX_SUFFIX + 1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if _claim(candidate):
            return candidate
        if not unique:
            found = ", ".join(_holds_a_run(candidate))
            raise RunDirError(
                f"run directory {candidate} already holds a run ({found}): continue it with"
                f" --resume {candidate}, or choose another --run-dir"
            )
    raise RunDirError(f"run directories {base} to {base}-{MAX_SUFFIX} are all taken; choose a --run-dir")


def open_run_dir(path: str | Path) -> Path:
    """The directory of a run already claimed (a resume, or a rank of a launched group)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)  # a rank on another machine may not see the claim
    return path


_restarts: set[str] = set()  # runs this process was asked to start over (resumed before a checkpoint)


def allow_restart(path: str | Path) -> None:
    """``--resume`` of a run that has no checkpoint yet: its next claim in this process re-opens it."""
    _restarts.add(os.path.abspath(path))


def choose_run_dir(path: str | Path, *, explicit: bool, claim: bool) -> Path:
    """The one call a loop or launcher makes: claim a new run's directory, or open a claimed one.

    ``explicit``: the user named ``path`` (refused if taken) rather than it being a default
    name (a free variant is taken). ``claim=False``: a resume, or a rank whose launcher claimed.
    """
    if claim and os.path.abspath(path) in _restarts:
        _restarts.discard(os.path.abspath(path))
        claim = False
    return claim_run_dir(path, unique=not explicit) if claim else open_run_dir(path)


# -- scratch directories of a launched group ------------------------------------------------------


def make_scratch_dir(prefix: str = SCRATCH_PREFIX, base: str | Path | None = None) -> Path:
    """A fresh private directory ``<prefix>-<pid>-XXXXXXXX`` in ``base`` (default: the temp dir)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=base))


def _owner_pid(name: str, prefix: str) -> int | None:
    rest = name[len(prefix) + 1 :] if name.startswith(prefix + "-") else ""
    pid, _, _ = rest.partition("-")
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def clean_stale_scratch(prefix: str = SCRATCH_PREFIX, base: str | Path | None = None) -> list[Path]:
    """Remove this user's scratch directories whose owner process is dead; return them.

    A directory without a pid in its name (an older launcher's) is left alone: its owner
    cannot be known. A pid reused by a new process keeps its directory until that one ends.
    """
    removed = []
    root = Path(base or tempfile.gettempdir())
    for path in root.glob(f"{prefix}-*"):
        pid = _owner_pid(path.name, prefix)
        with contextlib.suppress(OSError):
            info = path.lstat()
            if pid is None or not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid():
                continue
            if not _alive(pid):
                shutil.rmtree(path)
                removed.append(path)
    return removed

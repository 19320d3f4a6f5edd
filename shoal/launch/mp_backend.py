"""The ``mp`` backend: every rank a spawned process on this machine.

Nothing here takes a lock another process could die holding: each rank returns its result
over a pipe of its own, and the stop request and heartbeats are plain shared numbers
(``RawArray``) that the launcher writes and each rank's watcher thread reads. (A
multiprocessing ``Event`` blocks ``set()`` forever once a process waiting on it was killed,
which is what a signal to the whole process group does.) Pipes and a ``RawArray`` leave no
named semaphore in /dev/shm either, even after ``kill -9`` of everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from shoal.launch.supervisor import Exit, Key, Rank, Topology
from shoal.training.trainer import StopRequest

BEAT_S = 0.5  # how often a rank says it is alive


class RankError(str):
    """A rank's exception in one line, sent to the launcher before the rank exits, with its
    traceback (printed by the launcher only if this rank is to blame, not a peer's loss)."""

    traceback: str = ""


def _watch(stop: StopRequest, shared: Any, slot: int, parent_pid: int) -> None:
    """In each rank: beat, pass the launcher's stop on, and end the rank if the launcher died."""
    while True:
        shared[1 + slot] = time.monotonic()
        if shared[0] and not stop:
            stop.request("stop")
        if os.getppid() != parent_pid:  # even by SIGKILL
            os._exit(1)
        time.sleep(BEAT_S)


def _name_process(name: str) -> None:
    """Show the rank's role in ps/top (Linux: the process's comm, 15 characters at most)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _rank_main(rank: Rank, kwargs: dict, conn: Connection, shared: Any, slot: int, parent_pid: int) -> None:
    import faulthandler

    faulthandler.enable()  # a crash in native code (gloo, torch) still shows every thread's stack
    _name_process("shoal-server" if rank.role == "server" else f"shoal-worker-{rank.key}")
    # SIGINT/SIGTERM to the whole process group (Ctrl-C, Slurm, systemd, `timeout`) reach the
    # launcher too, which asks every rank to save and return (see _watch). Ignored here, as
    # a Python handler would let them interrupt gloo's threads mid-syscall, which wedged the
    # links (seen: a3c hung for good); the launcher ends a rank with SIGKILL when it must.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = StopRequest()
    threading.Thread(target=_watch, args=(stop, shared, slot, parent_pid), daemon=True).start()
    code = 1
    try:
        conn.send(rank.fn(**kwargs, stop=stop))
        code = 0
    except BaseException as error:
        report = RankError(" ".join(f"{type(error).__name__}: {error}".split()))
        report.traceback = traceback.format_exc()
        try:  # the launcher's one-line error says why, not just "code 1"
            conn.send(report)
        except Exception:
            traceback.print_exc()  # the launcher will not hear it: print it here
    finally:
        # Leave without interpreter teardown: torch's gloo threads can abort the process
        # there ("terminate called without an active exception") after the work is done.
        # Files are closed and checkpoints fsynced by now; only the streams need a flush.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class MpBackend:
    """Ranks as processes (spawned: no state inherited but what is passed)."""

    settle_s = 0.5

    def __init__(self, scratch: str) -> None:
        self.ctx = mp.get_context("spawn")
        self.scratch = scratch
        self.procs: dict[Key, Any] = {}
        self.conns: dict[Key, Connection] = {}
        self.started: dict[Key, float] = {}
        self.errors: dict[Key, str] = {}
        self.returned: set[Key] = set()
        self.hung: set[Key] = set()
        self.attempt = 0
        self.shared: Any = None
        self.slots: dict[Key, int] = {}

    def begin(self, topology: Topology) -> str:
        self.attempt += 1
        self.slots = {rank.key: i for i, rank in enumerate(topology.ranks)}
        self.shared = self.ctx.RawArray("d", 1 + len(self.slots))  # [stop, beat of each slot]
        self.procs, self.conns, self.errors, self.returned, self.hung = {}, {}, {}, set(), set()
        return f"file://{self.scratch}/rendezvous-{self.attempt}"

    def start(self, rank: Rank, kwargs: dict[str, Any]) -> None:
        receive, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_rank_main,
            name=f"shoal-train-{'worker-' if rank.role == 'worker' else ''}{rank.key}",
            args=(rank, kwargs, send, self.shared, self.slots[rank.key], os.getpid()),
            daemon=False,  # workers start env worker processes of their own
        )
        old = self.procs.get(rank.key)
        if old is not None:
            old.join(0)
        self.started[rank.key] = time.monotonic()  # (before the child can beat)
        proc.start()
        send.close()  # the child holds the only write end: its death is EOF here
        self.procs[rank.key], self.conns[rank.key] = proc, receive
        self.errors.pop(rank.key, None)
        self.hung.discard(rank.key)
        self.returned.discard(rank.key)

    def results(self) -> list[tuple[Key, Any]]:
        out = []
        for key, conn in self.conns.items():
            try:
                while conn.poll():
                    value = conn.recv()
                    if isinstance(value, RankError):
                        self.errors[key] = value
                    else:
                        self.returned.add(key)
                        out.append((key, value))
            except (EOFError, OSError):  # it exited (or died mid-send): its exit code says how
                pass
        return out

    def exit(self, key: Key) -> Exit | None:
        proc = self.procs[key]
        code = proc.exitcode
        if code is None or (code == 0 and key in self.returned) or (key in self.returned and code < 0):
            return None
        if key in self.hung:
            return Exit("hung (no sign of life) and was ended before returning a result", killed=True)
        if code < 0:
            return Exit(f"was killed by {signal.Signals(-code).name} before returning a result", killed=True)
        if key in self.errors:
            error = self.errors[key]
            return Exit(
                f"exited with code {code} before returning a result: {error}",
                killed=False,
                detail=error.traceback,
            )
        return Exit(f"exited with code {code} without a result", killed=False)

    def silent_for(self, key: Key) -> float:
        last = max(self.shared[1 + self.slots[key]], self.started[key])
        return time.monotonic() - last

    def has_started(self, key: Key) -> bool:
        return self.shared[1 + self.slots[key]] >= self.started[key]

    def request_stop(self) -> None:
        self.shared[0] = 1.0

    def kill(self, key: Key) -> None:
        self.hung.add(key)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.procs[key].pid, signal.SIGKILL)
        self.procs[key].join(5)

    def end(self, finished: bool) -> None:
        for proc in self.procs.values():
            proc.join(10 if finished else 0)  # after a failure, the others are stopped at once
            if proc.is_alive():
                proc.kill()  # (ranks ignore SIGTERM; their env workers see them go and leave)
                proc.join()
        for conn in self.conns.values():
            conn.close()

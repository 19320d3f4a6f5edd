"""Shared fixtures: every test must leave no child process behind.

CI runs the suite in two pytest-xdist processes (``-n 2 --dist worksteal``): at most two
tests run at once, so at most two multi-process training runs share the 2-core reference
machine. Work stealing keeps both xdist processes busy to the end (pinned groups of the
multi-process tests, ``--dist loadgroup``, made one group a 38-minute serial chain). The
checks that depend on timing allow for a neighbour: a rank has ``STARTUP_S`` for its first
sign of life, a semaphore check waits for the neighbours' own semaphores to go.
"""

from __future__ import annotations

import os
import signal
import time
import warnings

import psutil
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds 127.0.0.1 only


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first (a 600 s timeout, then the other slow ones): work stealing
    then ends the run on short tests, not with one xdist process idle beside a long one."""

    def rank(item: pytest.Item) -> int:
        timeout = item.get_closest_marker("timeout")
        if timeout is not None and timeout.args and timeout.args[0] >= 600:
            return 0
        return 1 if item.get_closest_marker("slow") is not None else 2

    items.sort(key=rank)  # stable: file order within each rank


def alive(pids: list[int]) -> list[int]:
    """The pids that still run (zombies count as gone: they hold no resources but a slot)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running at the timeout."""
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _ours(proc: psutil.Process) -> bool:
    """Children we start; multiprocessing's own long-lived helpers are not ours to stop."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "resource_tracker" not in cmdline and "forkserver" not in cmdline


@pytest.fixture(autouse=True)
def no_leftover_children():
    """Fail a test that leaves a child process of ours running."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    new = [p.pid for p in me.children(recursive=True) if p.pid not in before and _ours(p)]
    left = wait_gone(new, timeout=5.0)
    assert not left, f"test left child processes running: {left}"


@pytest.fixture(autouse=True)
def signal_dispositions_restored(request):
    """Put back SIGINT/SIGTERM as they were before the test, and say which test changed them.

    Ignored signals are inherited by every process started afterwards: in a full CI run,
    something left SIGINT ignored in one xdist process, and a later test's child then slept
    through its Ctrl-C (test_no_worker_outlives_its_parent[SIGINT-*], stderr empty)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in before.items():
        if signal.getsignal(s) is not handler and handler is not None:
            warnings.warn(f"{request.node.nodeid} left {s.name} as {signal.getsignal(s)}", stacklevel=1)
            signal.signal(s, handler)

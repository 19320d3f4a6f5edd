"""Links: the point-to-point channels between the parameter server and each worker.

Each link is a two-rank gloo process group of its own (server rank 0, worker rank 1), made
through a shared store under the key ``shoal/link/<worker>/<generation>/``. A single group
of all ranks would break as a whole when one worker dies, and torch.distributed cannot
add a member to a running group; separate links break alone, and a replacement worker opens
the next generation of its link while the other workers train on.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

SERVER, WORKER = 0, 1
WAIT = datetime.timedelta(hours=24)  # a wait without a bound: a dead peer shows as a broken link
# How long opening a link may wait for the other side. A worker announces its generation
# just before it opens its link, so the server gives up soon on one that announced and did not
# come (it died) and opens the next; a worker waits long, for a server still starting up.
SERVER_SETUP = datetime.timedelta(seconds=10)
WORKER_SETUP = datetime.timedelta(minutes=10)
POLL_S = 0.2
CLOSE_TAG = 1  # messages use tag 0; nothing is ever sent on this one (see Link.close)


def local_gloo(rendezvous: str) -> None:
    """A ``file://`` rendezvous means every rank is on this machine: keep gloo on loopback."""
    if rendezvous.startswith("file://"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")


def open_store(rendezvous: str, host: bool) -> dist.Store:
    """The store links meet through: a file on one machine, else a TCP store the server hosts."""
    local_gloo(rendezvous)
    setup = SERVER_SETUP if host else WORKER_SETUP
    if rendezvous.startswith("file://"):
        store = dist.FileStore(rendezvous.removeprefix("file://"), -1)
        store.set_timeout(setup)
        return store
    address = rendezvous.removeprefix("tcp://")
    hostname, port = address.rsplit(":", 1)
    return dist.TCPStore(hostname, int(port), is_master=host, wait_for_workers=False, timeout=setup)


def announce(store: dist.Store, worker: int, generation: int) -> None:
    """A worker says which generation of its link it is about to open (replacements count up).

    From here on the server counts it: if it is lost, even before its link opens, it counts
    as one worker lost (each generation is remembered, as the newest may skip some).
    """
    store.set(f"shoal/link/{worker}/announced/{generation}", "1")
    store.set(f"shoal/link/{worker}/latest", str(generation))


def was_announced(store: dist.Store, worker: int, generation: int) -> bool:
    """Whether ``worker``'s ``generation`` announced itself (then it existed, and was lost if skipped)."""
    return store.check([f"shoal/link/{worker}/announced/{generation}"])


def mark_lost(store: dist.Store, worker: int, generation: int, why: str) -> None:
    """The server gave up on ``worker``'s ``generation``: a supervisor replaces it (and ends the
    process if it still runs: a hung worker does not end by itself)."""
    store.set(f"shoal/link/{worker}/lost/{generation}", why)


def lost_why(store: dist.Store, worker: int, generation: int) -> str | None:
    """Why the server gave up on ``worker``'s ``generation``, or None if it did not."""
    key = f"shoal/link/{worker}/lost/{generation}"
    return store.get(key).decode() if store.check([key]) else None


def announced(store: dist.Store, worker: int, at_least: int) -> int:
    """Wait until ``worker`` announced a generation >= ``at_least``; return the newest one.

    The server opens the newest: a replacement that died before linking is skipped, not
    waited for.
    """
    key = f"shoal/link/{worker}/latest"
    while True:
        if store.check([key]):
            latest = int(store.get(key))
            if latest >= at_least:
                return latest
        time.sleep(POLL_S)


class PeerTimeout(TimeoutError):
    """The other side of a link sent (or took) nothing within the peer timeout: it hangs.

    The link is closed by then (gloo closes a pair whose wait timed out)."""

    def __init__(self, peer: str, seconds: float, link: str) -> None:
        super().__init__(
            f"{peer} did not answer within {seconds:g} s over {link}: it is stopped or hung, "
            f"or slower than the link's timeout (2 x --hang-timeout + 30 s) allows"
        )
        self.peer, self.seconds = peer, seconds


class Link:
    """One worker's channel to the server; blocks until the other side opens it too.

    Waits are unbounded unless given a ``timeout`` (seconds): then a peer that stays silent
    that long raises :class:`PeerTimeout`, and a broken link (a dead peer) ``RuntimeError``.
    """

    def __init__(self, store: dist.Store, worker: int, generation: int, side: int) -> None:
        self.worker, self.generation = worker, generation
        prefixed = dist.PrefixStore(f"shoal/link/{worker}/{generation}/", store)
        setup = SERVER_SETUP if side == SERVER else WORKER_SETUP  # (gloo's default for waits, too)
        self.group = dist.ProcessGroupGloo(prefixed, side, 2, setup)
        self.peer = WORKER if side == SERVER else SERVER
        self.peer_name = f"worker {worker}" if side == SERVER else "the parameter server"

    def __repr__(self) -> str:
        return f"the link of worker {self.worker} (generation {self.generation})"

    def isend(self, tensor: torch.Tensor) -> Any:
        return self.group.send([tensor], self.peer, 0)

    def irecv(self, tensor: torch.Tensor) -> Any:
        return self.group.recv([tensor], self.peer, 0)

    def wait(self, work: Any, timeout: float | None = None) -> None:
        """Wait for a send or receive to complete: without a ``timeout``, however long it takes."""
        if timeout is None:
            work.wait(WAIT)
            return
        start = time.monotonic()
        try:
            work.wait(datetime.timedelta(seconds=timeout))
        except RuntimeError as error:
            if "timed out" in str(error).lower() or time.monotonic() - start >= timeout:
                raise PeerTimeout(self.peer_name, timeout, repr(self)) from error
            raise

    def send(self, tensor: torch.Tensor, timeout: float | None = None) -> None:
        self.wait(self.isend(tensor), timeout)

    def recv(self, tensor: torch.Tensor, timeout: float | None = None) -> None:
        self.wait(self.irecv(tensor), timeout)

    def close(self) -> None:
        """Break the link for both sides: the peer's next send or receive fails, as does ours.

        gloo has no call that interrupts a pending receive (``abort`` and ``shutdown`` do
        nothing to one); a wait that times out closes the pair, and that does. So: a receive
        on a tag never sent to, with a 1 ms timeout.
        """
        with contextlib.suppress(RuntimeError):  # timed out (closed now), or broken already
            never = self.group.recv([torch.zeros(1, dtype=torch.uint8)], self.peer, CLOSE_TAG)
            never.wait(datetime.timedelta(milliseconds=1))

"""Links: the point-to-point channels between the parameter server and each worker.

Each link is a two-rank gloo process group of its own (server rank 0, worker rank 1), made
through a shared store under the key ``shoal/link/<worker>/<generation>/``. A single group
of all ranks would break as a whole when one worker dies, and torch.distributed cannot
add a member to a running group; separate links break alone, and a replacement worker opens
the next generation of its link while the other workers train on.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

SERVER, WORKER = 0, 1
WAIT = datetime.timedelta(hours=24)  # for a message: a dead peer shows as a broken link, not a timeout
# How long opening a link may wait for the other side. A worker announces its generation
# just before it opens its link, so the server gives up soon on one that announced and did not
# come (it died) and opens the next; a worker waits long, for a server still starting up.
SERVER_SETUP = datetime.timedelta(seconds=10)
WORKER_SETUP = datetime.timedelta(minutes=10)
POLL_S = 0.2


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
    """A worker says which generation of its link it is about to open (replacements count up)."""
    store.set(f"shoal/link/{worker}/latest", str(generation))


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


class Link:
    """One worker's channel to the server; blocks until the other side opens it too."""

    def __init__(self, store: dist.Store, worker: int, generation: int, side: int) -> None:
        self.worker, self.generation = worker, generation
        prefixed = dist.PrefixStore(f"shoal/link/{worker}/{generation}/", store)
        setup = SERVER_SETUP if side == SERVER else WORKER_SETUP  # (gloo's default for waits, too)
        self.group = dist.ProcessGroupGloo(prefixed, side, 2, setup)
        self.peer = WORKER if side == SERVER else SERVER

    def isend(self, tensor: torch.Tensor) -> Any:
        return self.group.send([tensor], self.peer, 0)

    def irecv(self, tensor: torch.Tensor) -> Any:
        return self.group.recv([tensor], self.peer, 0)

    @staticmethod
    def wait(work: Any) -> None:
        """Wait for a send or receive to complete, however long the other side takes."""
        work.wait(WAIT)

    def send(self, tensor: torch.Tensor) -> None:
        self.wait(self.isend(tensor))

    def recv(self, tensor: torch.Tensor) -> None:
        self.wait(self.irecv(tensor))

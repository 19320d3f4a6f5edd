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
from typing import Any

import torch
import torch.distributed as dist

SERVER, WORKER = 0, 1
TIMEOUT = datetime.timedelta(minutes=30)  # a replacement may take this long to arrive


def local_gloo(rendezvous: str) -> None:
    """A ``file://`` rendezvous means every rank is on this machine: keep gloo on loopback."""
    if rendezvous.startswith("file://"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")


def open_store(rendezvous: str, host: bool) -> dist.Store:
    """The store links meet through: a file on one machine, else a TCP store the server hosts."""
    local_gloo(rendezvous)
    if rendezvous.startswith("file://"):
        return dist.FileStore(rendezvous.removeprefix("file://"), -1)
    address = rendezvous.removeprefix("tcp://")
    hostname, port = address.rsplit(":", 1)
    return dist.TCPStore(hostname, int(port), is_master=host, wait_for_workers=False, timeout=TIMEOUT)


class Link:
    """One worker's channel to the server; blocks until the other side opens it too."""

    def __init__(self, store: dist.Store, worker: int, generation: int, side: int) -> None:
        self.worker, self.generation = worker, generation
        prefixed = dist.PrefixStore(f"shoal/link/{worker}/{generation}/", store)
        self.group = dist.ProcessGroupGloo(prefixed, side, 2, TIMEOUT)
        self.peer = WORKER if side == SERVER else SERVER

    def isend(self, tensor: torch.Tensor) -> Any:
        return self.group.send([tensor], self.peer, 0)

    def irecv(self, tensor: torch.Tensor) -> Any:
        return self.group.recv([tensor], self.peer, 0)

    def send(self, tensor: torch.Tensor) -> None:
        self.isend(tensor).wait()

    def recv(self, tensor: torch.Tensor) -> None:
        self.irecv(tensor).wait()

"""The parameter server: the global model and its optimizers, for ``a3c`` and ``param-server``.

It runs beside the workers (a process on ``mp``, a Ray actor on ``ray``) and talks to each
over its own link (``shoal.distributed.link``), so a worker that dies takes only its link down. A
worker pushes a gradient for one of the algorithm's optimizers (with the global version of
that optimizer's weights its own came from); the server applies it with its copy of that
optimizer and answers with the change of those weights since that worker last pulled. In
``async`` mode (A3C) each push is applied at once; a gradient more than ``max_lag`` updates
of its optimizer stale is dropped and counted. In ``sync`` mode a round is one push for an
optimizer from every live worker: the server applies their sample-weighted mean and answers
them all. The messages are those of ``shoal.distributed.wire``.

Answers are compressed like the pushes. The server keeps, per worker, a mirror of the
weights that worker holds, and sends ``global - mirror`` each time: what a lossy answer
leaves out is sent later, and the mirror stays exactly equal to the worker's copy.

A worker is lost when its link breaks (it died), when it dies while opening it, when a
newer generation replaced it before it linked, or when it owes a message for longer than
``peer_timeout`` (it hangs; the server then closes its link). Each counts once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import optim

from shoal.distributed import wire
from shoal.distributed.compress import Compressor
from shoal.distributed.link import SERVER, Link, PeerTimeout, announced, mark_lost, was_announced
from shoal.distributed.strategy import flat_params, set_grad, trained_params

if TYPE_CHECKING:
    from shoal.normalize import Normalizer

log = logging.getLogger("shoal")
TICK_S = 1.0  # the serve loop looks at the clock at least this often (timeouts, Waiting)


class ParameterServer:
    """Global weights and optimizers; applies gradients pushed by ``num_workers`` workers."""

    def __init__(
        self,
        optimizers: optim.Optimizer | Iterable[optim.Optimizer],
        num_workers: int,
        mode: str = "async",
        max_lag: int | None = None,
        compress: str = "none",
        topk_ratio: float = 0.01,
        peer_timeout: float | None = wire.PEER_TIMEOUT_S,
        normalizer: Normalizer | None = None,
    ) -> None:
        if mode not in ("sync", "async"):
            raise ValueError(f"ps_mode must be sync or async, got {mode!r}")
        if isinstance(optimizers, optim.Optimizer):
            optimizers = [optimizers]
        self.optimizers = list(optimizers)  # the algorithm's, in its optimizers() order
        self.params = [trained_params(o) for o in self.optimizers]
        self.num_workers, self.mode, self.max_lag = num_workers, mode, max_lag
        self.peer_timeout = peer_timeout
        sizes = [sum(p.numel() for p in params) for params in self.params]
        self.spans = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self.push_codecs = [Compressor(compress, n, topk_ratio) for n in sizes]  # only decompress here
        self.pull_codecs = [
            [Compressor(compress, n, topk_ratio, error_feedback=False) for n in sizes]
            for _ in range(num_workers)
        ]
        self.mirrors = [self.weights().clone() for _ in range(num_workers)]  # every optimizer's, flat
        self.versions = [0] * len(sizes)  # global updates applied, per optimizer
        self.pushes = 0
        self.dropped = 0
        self.pending: list[list[tuple[torch.Tensor, float, float]]] = [[] for _ in sizes]  # sync rounds
        self.lost = 0  # workers lost (died, or hung), each generation counted once
        self.joins = 0  # links opened: num_workers at the start, one more per replacement
        # The observation/return statistics every worker normalises with: each push brings a
        # worker's new data, merged here (Chan et al.), and each answer takes the result back.
        self.normalizer = normalizer if normalizer is not None and normalizer.active else None
        self.stats_size = self.normalizer.size if self.normalizer is not None else 0

    def statistics(self) -> torch.Tensor:
        """The merged statistics as they are now (empty without normalisation)."""
        if self.normalizer is None:
            return wire.NO_STATS
        return torch.from_numpy(self.normalizer.used_vector())

    def add_statistics(self, stats: torch.Tensor) -> None:
        """Merge a worker's new statistics (a vector the size of ours; anything else is ignored)."""
        if self.normalizer is not None and stats.numel() == self.stats_size:
            self.normalizer.merge([stats.numpy().copy()])

    @property
    def version(self) -> int:
        """Global updates applied, over every optimizer."""
        return sum(self.versions)

    def weights(self) -> torch.Tensor:
        """Every optimizer's parameters as one flat vector (the wire's Weights)."""
        return torch.cat([flat_params(params) for params in self.params])

    def push(
        self, grad: torch.Tensor, samples: float, lr: float, version: int, optimizer: int = 0
    ) -> tuple[bool, int]:
        """Take one worker's gradient for ``optimizer``; return (accepted, its lag in updates).

        In sync mode the gradient waits for the round (``apply_round``) and counts as accepted.
        """
        self.pushes += 1
        lag = self.versions[optimizer] - version
        if samples <= 0 and self.mode == "async":
            return True, lag  # the worker skipped a non-finite gradient: nothing to apply
        if self.mode == "sync":  # grad may view a reused receive buffer
            self.pending[optimizer].append((grad.clone(), samples, lr))
            return True, lag
        if self.max_lag is not None and lag > self.max_lag:
            self.dropped += 1
            return False, lag
        self._apply(optimizer, grad, lr)
        return True, lag

    def apply_round(self, optimizer: int | None = None) -> None:
        """Sync mode: one update with the sample-weighted mean of the round's gradients
        (of ``optimizer``; None: of every optimizer with a round pending)."""
        for i in range(len(self.optimizers)) if optimizer is None else [optimizer]:
            pending = self.pending[i]
            total = sum(s for _, s, _ in pending)
            if total > 0:  # 0: every worker skipped a non-finite gradient this round
                grad = sum(g * s for g, s, _ in pending) / total
                self._apply(i, grad, pending[-1][2])
            pending.clear()

    def _apply(self, i: int, grad: torch.Tensor, lr: float) -> None:
        for group in self.optimizers[i].param_groups:
            group["lr"] = lr  # the worker's schedule (annealing) decides
        set_grad(self.params[i], grad)
        self.optimizers[i].step()
        self.versions[i] += 1

    def pull(self, worker: int, optimizer: int = 0) -> tuple[torch.Tensor, ...]:
        """The payload that brings ``worker``'s copy of ``optimizer``'s weights to the global ones
        (as far as it can)."""
        codec = self.pull_codecs[worker][optimizer]
        lo, hi = self.spans[optimizer]
        mirror = self.mirrors[worker][lo:hi]
        payload = codec.compress(flat_params(self.params[optimizer]) - mirror)
        mirror += codec.decompress(payload)
        return payload

    def serve(self, store: Any) -> dict[str, Any]:
        """Answer the workers, each over its own link, until every one has said it is done.

        One thread per worker receives from that worker's link; this thread alone touches
        the weights. A worker whose link breaks (it died) leaves the round; its replacement
        opens the link's next generation, is greeted with the global weights, and joins in.
        """
        return _Session(self, store).run()

    @staticmethod
    def _listen(store: Any, worker: int, size: int, events: queue.Queue) -> None:
        """Receive ``worker``'s messages; after a break, wait for its replacement's link.

        Events: (what, worker, generation, item). Every generation that announced itself and
        is lost is reported (the session counts each once).
        """
        generation = 0
        while True:
            latest = announced(store, worker, generation)
            for skipped in range(generation, latest):  # replaced before the server saw them
                if was_announced(store, worker, skipped):
                    events.put(("lost", worker, skipped, "it was replaced before its link opened"))
            generation = latest
            try:
                link = Link(store, worker, generation, SERVER)
            except RuntimeError:  # it died while linking: wait for the next one
                events.put(("lost", worker, generation, "it died while opening its link"))
                generation += 1
                continue
            events.put(("joined", worker, generation, link))
            try:
                while True:  # unbounded: the session bounds the waits that it must (see _Session.watch)
                    buffer = torch.empty(size, dtype=torch.uint8)
                    link.recv(buffer)
                    events.put(("message", worker, generation, buffer))
                    if wire.kind(buffer) == wire.DONE:
                        return
            except RuntimeError:  # the worker died, or the session closed its link: broken for good
                events.put(("lost", worker, generation, "its link broke"))
                generation += 1


class _Session:
    """One ``serve``: the links, who waits for what, and who was lost (each generation once)."""

    def __init__(self, server: ParameterServer, store: Any) -> None:
        self.server, self.store = server, store
        n = server.num_workers
        self.layouts = [c.empty() for c in server.push_codecs]
        self.events: queue.Queue = queue.Queue()
        self.links: dict[int, Link] = {}
        self.greetings: dict[int, Any] = {}  # worker: (send work, buffer) of its greeting, in flight
        self.done: set[int] = set()
        self.absent: set[int] = set()  # lost and not yet replaced: a sync round goes on without them
        self.waiting: list[list[tuple[int, bool, int]]] = [[] for _ in server.optimizers]  # per optimizer
        self.lost: set[tuple[int, int]] = set()  # (worker, generation) counted as lost
        self.owes: dict[int, float] = {}  # worker: since when it owes us its next message
        self.last_sent: dict[int, float] = {}
        self.sps = [0.0] * n

    def run(self) -> dict[str, Any]:
        s = self.server
        size = wire.push_size(self.layouts, s.stats_size)
        for worker in range(s.num_workers):
            args = (self.store, worker, size, self.events)
            threading.Thread(target=s._listen, args=args, daemon=True).start()
        tick = TICK_S if s.peer_timeout is None else min(TICK_S, s.peer_timeout / 8)
        while len(self.done) < s.num_workers:
            try:
                what, worker, generation, item = self.events.get(timeout=tick)
            except queue.Empty:
                pass
            else:
                getattr(self, f"on_{what}")(worker, generation, item)
            self.answer()
            self.watch()
        self.send(0, wire.Weights(s.weights(), s.statistics()))  # the final global model, to the chief
        return {
            "version": s.version,
            "pushes": s.pushes,
            "dropped": s.dropped,
            "workers_lost": s.lost,
            "workers_joined": s.joins,
        }

    def on_joined(self, worker: int, generation: int, link: Link) -> None:
        s = self.server
        self.links[worker] = link
        self.absent.discard(worker)
        self.owes.pop(worker, None)  # its first push follows its start-up: no bound on that
        s.joins += 1
        s.mirrors[worker] = s.weights().clone()
        # The greeting (the global weights as they are) goes out without waiting for the new
        # worker to take it: it may still be building its envs. Its first push comes after.
        greeting = wire.encode(wire.Weights(s.mirrors[worker], s.statistics()))
        self.greetings[worker] = (link.isend(greeting), greeting)
        self.last_sent[worker] = time.monotonic()

    def on_lost(self, worker: int, generation: int, why: str) -> None:
        """Count a lost generation once (its send may have failed before its listener saw it)."""
        if (worker, generation) not in self.lost:
            self.lost.add((worker, generation))
            self.server.lost += 1
            log.info(f"parameter server: worker {worker} (generation {generation}) is lost: {why}")
            mark_lost(self.store, worker, generation, why)
        link = self.links.get(worker)
        if link is None or link.generation != generation:
            return  # (a generation that never linked, or was dropped already)
        del self.links[worker]
        self.greetings.pop(worker, None)
        self.owes.pop(worker, None)
        self.absent.add(worker)
        self.waiting = [[w for w in waiting if w[0] != worker] for waiting in self.waiting]
        link.close()  # a hung worker that wakes up finds its link broken, and stops

    def on_message(self, worker: int, generation: int, buffer: torch.Tensor) -> None:
        s = self.server
        link = self.links.get(worker)
        if link is None or link.generation != generation:
            return  # from a link dropped meanwhile (its worker timed out): not one of ours now
        self.owes.pop(worker, None)
        message = wire.decode(buffer, self.layouts)
        if isinstance(message, wire.Done):
            self.done.add(worker)
            return
        if not isinstance(message, wire.Push):
            raise RuntimeError(f"worker {worker} sent a {type(message).__name__}; workers send pushes")
        i = message.optimizer
        self.sps[worker] = message.worker_sps
        s.add_statistics(message.stats)
        grad = s.push_codecs[i].decompress(message.payload)
        accepted, lag = s.push(grad, message.samples, message.lr, message.version, i)
        self.waiting[i].append((worker, accepted, lag))

    def answer(self) -> None:
        """Answer the pushes that can be answered (in sync mode: complete rounds only)."""
        s = self.server
        expected = set(range(s.num_workers)) - self.done - self.absent
        for i, waiting in enumerate(self.waiting):
            if s.mode == "sync" and waiting and {w for w, _, _ in waiting} < expected:
                continue  # the round is not complete yet
            if s.mode == "sync" and s.pending[i]:
                s.apply_round(i)
            self.waiting[i] = []
            for worker, accepted, lag in waiting:
                payload, stats = s.pull(worker, i), s.statistics()
                reply = wire.Reply(i, s.versions[i], accepted, lag, s.dropped, self.sps, payload, stats)
                if self.send(worker, reply):
                    self.owes[worker] = time.monotonic()  # from now on it owes us its next message

    def watch(self) -> None:
        """Drop a worker that owes a message for longer than the peer timeout (it hangs), and
        tell a worker still waiting for an answer (a sync round, the final weights) we are alive."""
        timeout = self.server.peer_timeout
        if timeout is None:
            return
        now = time.monotonic()
        for worker, since in list(self.owes.items()):
            if now - since > timeout and worker in self.links:
                why = f"it sent nothing for {timeout:g} s (--peer-timeout): it hangs"
                self.on_lost(worker, self.links[worker].generation, why)
        waiters = {w for waiting in self.waiting for w, _, _ in waiting} | ({0} & self.done)
        for worker in waiters:
            if now - self.last_sent.get(worker, now) > timeout / 4:
                self.send(worker, wire.Waiting())

    def send(self, worker: int, message: wire.Message) -> bool:
        """Send, unless the worker died or hangs: then it is lost (once) and we go on without it."""
        link = self.links.get(worker)
        if link is None:
            return False
        timeout = self.server.peer_timeout
        try:
            if worker in self.greetings:  # taken by now: the worker pushed (or said Done) after it
                link.wait(self.greetings.pop(worker)[0], timeout)
            link.send(wire.encode(message), timeout)
        except PeerTimeout:
            self.on_lost(worker, link.generation, f"it took nothing for {timeout:g} s: it hangs")
            return False
        except RuntimeError:
            self.on_lost(worker, link.generation, "its link broke")
            return False
        self.last_sent[worker] = time.monotonic()
        return True

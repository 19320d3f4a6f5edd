"""The parameter server: the global model and its optimizer, for ``a3c`` and ``param-server``.

It runs beside the workers (a process on ``mp``, a Ray actor on ``ray``) and talks to each
over its own link (``shoal.distributed.link``), so a worker that dies takes only its link down. A
worker pushes a gradient (with the global version its weights came from); the server
applies it with the algorithm's own optimizer and answers with the change of the global
weights since that worker last pulled. In ``async`` mode (A3C) each push is applied at
once; a gradient more than ``max_lag`` updates stale is dropped and counted. In ``sync``
mode the server waits for every linked worker, applies their sample-weighted mean, and
answers them all.

Answers are compressed like the pushes. The server keeps, per worker, a mirror of the
weights that worker holds, and sends ``global - mirror`` each time: what a lossy answer
leaves out is sent later, and the mirror stays exactly equal to the worker's copy.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch
from torch import optim

from shoal.distributed.compress import Compressor, nbytes, pack, unpack
from shoal.distributed.link import SERVER, Link, announced
from shoal.distributed.strategy import DONE, flat_params, push_message, set_grad, trained_params


class ParameterServer:
    """Global weights and optimizer; applies gradients pushed by ``num_workers`` workers."""

    def __init__(
        self,
        optimizer: optim.Optimizer,
        num_workers: int,
        mode: str = "async",
        max_lag: int | None = None,
        compress: str = "none",
        topk_ratio: float = 0.01,
    ) -> None:
        if mode not in ("sync", "async"):
            raise ValueError(f"ps_mode must be sync or async, got {mode!r}")
        self.optimizer, self.params = optimizer, trained_params(optimizer)
        self.num_workers, self.mode, self.max_lag = num_workers, mode, max_lag
        n = sum(p.numel() for p in self.params)
        self.push_codec = Compressor(compress, n, topk_ratio)  # only decompresses here
        self.pull_codecs = [
            Compressor(compress, n, topk_ratio, error_feedback=False) for _ in range(num_workers)
        ]
        self.mirrors = [flat_params(self.params).clone() for _ in range(num_workers)]
        self.version = 0  # global updates applied
        self.pushes = 0
        self.dropped = 0
        self.pending: list[tuple[torch.Tensor, float, float]] = []  # sync mode: this round's
        self.lost = 0  # workers whose link broke (they died)
        self.joins = 0  # links opened: num_workers at the start, one more per replacement

    def push(self, grad: torch.Tensor, samples: float, lr: float, version: int) -> tuple[bool, int]:
        """Take one worker's gradient; return (accepted, its lag in updates).

        In sync mode the gradient waits for the round (``apply_round``) and counts as accepted.
        """
        self.pushes += 1
        lag = self.version - version
        if samples <= 0 and self.mode == "async":
            return True, lag  # the worker skipped a non-finite gradient: nothing to apply
        if self.mode == "sync":
            self.pending.append((grad.clone(), samples, lr))  # grad may view a reused receive buffer
            return True, lag
        if self.max_lag is not None and lag > self.max_lag:
            self.dropped += 1
            return False, lag
        self._apply(grad, lr)
        return True, lag

    def apply_round(self) -> None:
        """Sync mode: one update with the sample-weighted mean of the round's gradients."""
        total = sum(s for _, s, _ in self.pending)
        if total > 0:  # 0: every worker skipped a non-finite gradient this round
            grad = sum(g * s for g, s, _ in self.pending) / total
            self._apply(grad, self.pending[-1][2])
        self.pending.clear()

    def _apply(self, grad: torch.Tensor, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # the worker's schedule (annealing) decides
        set_grad(self.params, grad)
        self.optimizer.step()
        self.version += 1

    def pull(self, worker: int) -> tuple[torch.Tensor, ...]:
        """The payload that brings ``worker``'s copy to the global weights (as far as it can)."""
        codec = self.pull_codecs[worker]
        payload = codec.compress(flat_params(self.params) - self.mirrors[worker])
        self.mirrors[worker] += codec.decompress(payload)
        return payload

    def serve(self, store: Any) -> dict[str, Any]:
        """Answer the workers, each over its own link, until every one has said it is done.

        One thread per worker receives from that worker's link; this thread alone touches
        the weights. A worker whose link breaks (it died) leaves the round; its replacement
        opens the link's next generation, is greeted with the global weights, and joins in.
        """
        events: queue.Queue = queue.Queue()
        like = push_message(self.push_codec)
        for worker in range(self.num_workers):
            threading.Thread(target=self._listen, args=(store, worker, like, events), daemon=True).start()
        links: dict[int, Link] = {}
        done: set[int] = set()
        absent: set[int] = set()  # lost and not yet replaced: a sync round goes on without them
        waiting: list[tuple[int, bool, int]] = []  # who waits for an answer (sync: for the round)
        sps = torch.zeros(self.num_workers, dtype=torch.float64)

        def send(worker: int, tensor: torch.Tensor) -> None:
            """Send, unless the worker died meanwhile: its listener reports the loss; go on without it."""
            link = links.get(worker)
            if link is None:
                return
            try:
                link.send(tensor)
            except RuntimeError:
                links.pop(worker, None)
                absent.add(worker)

        while len(done) < self.num_workers:
            kind, src, item = events.get()
            if kind == "joined":
                links[src] = item
                absent.discard(src)
                self.joins += 1
                self.mirrors[src] = flat_params(self.params).clone()
                send(src, self.mirrors[src])  # the greeting: the global weights as they are
            elif kind == "lost":
                links.pop(src, None)
                absent.add(src)
                waiting = [w for w in waiting if w[0] != src]
                self.lost += 1
            else:
                header, *payload = unpack(item, like)
                msg_kind, version, samples, lr, worker_sps = header.tolist()
                if msg_kind == DONE:
                    done.add(src)
                else:
                    sps[src] = worker_sps
                    accepted, lag = self.push(
                        self.push_codec.decompress(tuple(payload)), samples, lr, int(version)
                    )
                    waiting.append((src, accepted, lag))
            expected = set(range(self.num_workers)) - done - absent
            if self.mode == "sync" and waiting and {w for w, _, _ in waiting} < expected:
                continue  # the round is not complete yet
            if self.mode == "sync" and self.pending:
                self.apply_round()
            for worker, accepted, lag in waiting:
                head = torch.tensor([self.version, accepted, lag, self.dropped], dtype=torch.float64)
                send(worker, pack((torch.cat([head, sps]), *self.pull(worker))))
            waiting.clear()
        send(0, flat_params(self.params).contiguous())  # the final global model, to the chief
        return {
            "version": self.version,
            "pushes": self.pushes,
            "dropped": self.dropped,
            "workers_lost": self.lost,
            "workers_joined": self.joins,
        }

    @staticmethod
    def _listen(store: Any, worker: int, like: tuple, events: queue.Queue) -> None:
        """Receive ``worker``'s messages; after a break, wait for its replacement's link."""
        generation = 0
        while True:
            generation = announced(store, worker, generation)
            try:
                link = Link(store, worker, generation, SERVER)
            except RuntimeError:  # it died while linking: wait for the next one
                generation += 1
                continue
            events.put(("joined", worker, link))
            try:
                while True:
                    buffer = torch.empty(nbytes(like), dtype=torch.uint8)
                    link.recv(buffer)
                    events.put(("message", worker, buffer))
                    if unpack(buffer, like)[0][0].item() == DONE:
                        return
            except RuntimeError:  # the worker died: its link is broken for good
                events.put(("lost", worker, None))
                generation += 1

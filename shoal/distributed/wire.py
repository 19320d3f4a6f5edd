"""The parameter server's wire format: every message between a worker and the server.

A message is ONE byte buffer (one gloo send): a fixed header packed with ``struct``, then
the tensors it carries, raw. Nothing is pickled. The server and the workers build and read
the typed messages below; only this module knows where the bytes go.

Every header starts with the same 8 bytes: ``kind`` (uint16), ``FORMAT`` (uint16, the
layout's version) and ``optimizer`` (uint32: which optimizer of the algorithm, by its
index in the algorithm's ``optimizers()`` dict order; 0 where it does not apply). All
fields are little-endian. Byte layout, after those 8 bytes:

==========  ===============================================  ================================
message     header fields                                    then
==========  ===============================================  ================================
Push        version int64, samples float64, lr float64,      float64 x stats (the worker's
            worker_sps float64, stats int64 (48 bytes)       new statistics), then the
                                                             optimizer's (compressed) gradient
Done        (8 bytes in all)                                 nothing
Reply       version int64, lag int64, dropped int64,         float64 x workers (each worker's
            accepted int64, workers int64, stats int64       sps), float64 x stats (the merged
            (56 bytes)                                       statistics), then the weight change
Weights     numel int64, stats int64 (24 bytes)              float64 x stats, then float32 x
                                                             numel: every optimizer's
                                                             parameters, in optimizer order
Waiting     (8 bytes in all)                                 nothing
==========  ===============================================  ================================

``stats`` counts the float64 values of the observation/return statistics
(``shoal.normalize``; 0 when normalisation is off): a worker sends what it gathered since
its last push, the server answers with the merged statistics everyone normalises with.

A payload is a tuple of tensors of fixed shapes (``Compressor.empty()``), laid out one after
the other as raw bytes. Headers are multiples of 8 bytes, so every payload tensor starts
aligned for its dtype and is read in place (a view of the receive buffer, no copy).

Messages are shorter than the buffer they are received into where the receiver cannot know
the size in advance (the server receives a push for any optimizer, or a Done, into a buffer
as large as the largest push; a worker takes a Waiting where it expects a Reply): gloo
delivers a message into any receive buffer at least as large (pinned by a test).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

FORMAT = 2
# How long a peer may take to send a message it owes (a worker's next push, the server's
# answer) before it is declared hung: a stopped (SIGSTOP) or deadlocked process never breaks
# its link. Generous, as a legitimately slow env step or evaluation looks the same. While
# the server owes a worker an answer it cannot give yet, it sends a Waiting every quarter.
PEER_TIMEOUT_S = 60.0
PUSH, DONE, REPLY, WEIGHTS, WAITING = 1, 2, 3, 4, 5

_PREFIX = struct.Struct("<HHI")  # kind, format, optimizer
_PUSH = struct.Struct("<HHIqdddq")
_REPLY = struct.Struct("<HHIqqqqqq")
_WEIGHTS = struct.Struct("<HHIqq")
NO_STATS = torch.zeros(0, dtype=torch.float64)

Payload = tuple[torch.Tensor, ...]


def peer_timeout_of(config: object) -> float | None:
    """How long a link waits for its peer's next message (None: without bound).

    Past the supervisor's ``--hang-timeout``, which finds a frozen process first and ends it:
    a link's timeout is the second line of defence, for a peer that is alive but stuck.
    """
    seconds = getattr(config, "hang_timeout", PEER_TIMEOUT_S)
    return 2.0 * float(seconds) + 30.0 if seconds else None


@dataclass
class Push:
    """A worker's gradient for one optimizer, computed on the global weights of ``version``."""

    optimizer: int
    version: int
    samples: float  # 0: a skipped (non-finite) step; the server applies nothing
    lr: float  # the worker's learning rate schedule decides the server's
    worker_sps: float
    payload: Payload
    stats: torch.Tensor = NO_STATS  # float64: the statistics gathered since the last push


@dataclass
class Done:
    """The worker has finished training (the chief then waits for the final weights)."""


@dataclass
class Reply:
    """The server's answer to a push: the change of that optimizer's weights, and counters."""

    optimizer: int
    version: int  # that optimizer's global version, after this push
    accepted: bool  # False: dropped as too stale
    lag: int  # global updates between the push's version and the server's at its arrival
    dropped: int  # pushes the server dropped, from every worker
    worker_sps: list[float]  # every worker's env steps/s, as last pushed
    payload: Payload
    stats: torch.Tensor = NO_STATS  # float64: the merged statistics, as they are now


@dataclass
class Weights:
    """Every optimizer's parameters, flat, in optimizer order: the greeting and the final model."""

    weights: torch.Tensor
    stats: torch.Tensor = NO_STATS  # float64: the merged statistics


@dataclass
class Waiting:
    """The server is alive and still owes an answer (a sync round, the final weights)."""


Message = Push | Done | Reply | Weights | Waiting


def _bytes(parts: Payload) -> list[torch.Tensor]:
    return [p.detach().contiguous().reshape(-1).view(torch.uint8) for p in parts]


def _frame(header: bytes, parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.frombuffer(bytearray(header), dtype=torch.uint8), *parts])


def encode(message: Message) -> torch.Tensor:
    """The message as one uint8 tensor, ready to send."""
    if isinstance(message, Push):
        m = message
        header = _PUSH.pack(
            PUSH, FORMAT, m.optimizer, m.version, m.samples, m.lr, m.worker_sps, m.stats.numel()
        )
        return _frame(header, _bytes((m.stats.double(), *m.payload)))
    if isinstance(message, Reply):
        m = message
        sps = torch.tensor(m.worker_sps, dtype=torch.float64)
        header = _REPLY.pack(
            REPLY,
            FORMAT,
            m.optimizer,
            m.version,
            m.lag,
            m.dropped,
            int(m.accepted),
            len(m.worker_sps),
            m.stats.numel(),
        )
        return _frame(header, _bytes((sps, m.stats.double(), *m.payload)))
    if isinstance(message, Weights):
        m = message
        header = _WEIGHTS.pack(WEIGHTS, FORMAT, 0, m.weights.numel(), m.stats.numel())
        return _frame(header, _bytes((m.stats.double(), m.weights.float())))
    if isinstance(message, Done | Waiting):
        return _frame(_PREFIX.pack(DONE if isinstance(message, Done) else WAITING, FORMAT, 0), [])
    raise TypeError(f"not a wire message: {message!r}")


def kind(buffer: torch.Tensor) -> int:
    """The kind of the message at the start of ``buffer`` (PUSH, DONE, ...)."""
    found, fmt, _ = _PREFIX.unpack_from(buffer[: _PREFIX.size].numpy())
    if fmt != FORMAT:
        raise ValueError(f"wire format {fmt} from the other side, this side speaks {FORMAT}")
    return found


def _payload(buffer: torch.Tensor, offset: int, like: Payload) -> Payload:
    out = []
    for t in like:
        n = t.numel() * t.element_size()
        out.append(buffer[offset : offset + n].view(t.dtype).view(t.shape))
        offset += n
    return tuple(out)


def decode(buffer: torch.Tensor, layouts: list[Payload] | None = None) -> Message:
    """The message in ``buffer`` (a uint8 tensor at least as long as it).

    ``layouts[i]`` is the shape of optimizer ``i``'s payload (``Compressor.empty()``), needed
    for a Push or a Reply. Payload tensors are views of ``buffer``: do not reuse it while they
    are in use.
    """
    raw = buffer.numpy()
    found = kind(buffer)
    if found == PUSH:
        _, _, opt, version, samples, lr, sps, n = _PUSH.unpack_from(raw)
        stats = buffer[_PUSH.size : _PUSH.size + 8 * n].view(torch.float64)
        payload = _payload(buffer, _PUSH.size + 8 * n, _layout(layouts, opt))
        return Push(opt, version, samples, lr, sps, payload, stats)
    if found == REPLY:
        _, _, opt, version, lag, dropped, accepted, workers, n = _REPLY.unpack_from(raw)
        start = _REPLY.size + 8 * workers
        sps = buffer[_REPLY.size : start].view(torch.float64).tolist()
        stats = buffer[start : start + 8 * n].view(torch.float64)
        payload = _payload(buffer, start + 8 * n, _layout(layouts, opt))
        return Reply(opt, version, bool(accepted), lag, dropped, sps, payload, stats)
    if found == WEIGHTS:
        numel, n = _WEIGHTS.unpack_from(raw)[3:]
        start = _WEIGHTS.size + 8 * n
        stats = buffer[_WEIGHTS.size : start].view(torch.float64)
        return Weights(buffer[start : start + 4 * numel].view(torch.float32), stats)
    if found == DONE:
        return Done()
    if found == WAITING:
        return Waiting()
    raise ValueError(f"unknown wire message kind {found}")


def _layout(layouts: list[Payload] | None, optimizer: int) -> Payload:
    if layouts is None or not 0 <= optimizer < len(layouts):
        raise ValueError(f"a message for optimizer {optimizer}, but this side knows {len(layouts or [])}")
    return layouts[optimizer]


def _nbytes(parts: Payload) -> int:
    return sum(p.numel() * p.element_size() for p in parts)


def push_size(layouts: list[Payload], stats: int = 0) -> int:
    """Bytes of the largest push (any optimizer's; a Done is shorter): the server's receive buffer."""
    return _PUSH.size + 8 * stats + max(_nbytes(like) for like in layouts)


def reply_size(layout: Payload, workers: int, stats: int = 0) -> int:
    """Bytes of a reply for an optimizer whose pull payload is shaped like ``layout``."""
    return _REPLY.size + 8 * workers + 8 * stats + _nbytes(layout)


def weights_size(numel: int, stats: int = 0) -> int:
    """Bytes of a Weights message of ``numel`` parameters (and ``stats`` statistics)."""
    return _WEIGHTS.size + 8 * stats + 4 * numel

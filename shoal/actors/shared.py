"""Shared memory between actor processes and the learner on one machine.

Two structures, both preallocated once in memory every process maps (``RawArray``: an
anonymous file unlinked at birth, so nothing is left in /dev/shm even after ``kill -9``):

- :class:`TrajectoryRing`: slots of fixed-length trajectories, ``slots_per_actor`` owned by
  each actor. An actor fills one of its free slots and sends its index (4 bytes) over its
  own pipe; the learner copies the slot out, then sends the index back, which frees it.
  Only indices cross the pipes: nothing on the data path is pickled, and a slot is written
  by one process at a time (its owner until it sends the index, nobody until it is freed).
  Each slot's header holds the policy version that acted, the actor and its sequence
  number, and a CRC32 of the slot's bytes, so the learner can prove it read what was written.
- :class:`WeightBuffer`: one float32 vector (the policy and anything actors need with it,
  e.g. observation statistics) under a sequence lock. The learner is the only writer: it
  makes the sequence odd, writes, makes it even. A reader copies the vector and keeps the
  copy only if the sequence was the same even number before and after, and the CRC32 of
  what it copied is the one published, so it never acts with a half-written vector.
  (The CRC covers what x86's store ordering guarantees and a weakly ordered CPU may not.)
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

HEADER = ("version", "actor", "seq", "crc")  # int64 fields of a slot's header
_INDEX = struct.Struct("<i")  # a slot index on a pipe
ERROR_TAG = b"E"  # a pipe message that is not 4 bytes: an actor's error, as UTF-8 text


def pack_index(slot: int) -> bytes:
    return _INDEX.pack(slot)


def unpack_index(message: bytes) -> int:
    return _INDEX.unpack(message)[0]


@dataclass(frozen=True)
class TrajectoryLayout:
    """The arrays of one trajectory: ``length`` steps of ``num_envs`` envs, time-major."""

    length: int
    num_envs: int
    obs_shape: tuple[int, ...]
    obs_dtype: str
    action_shape: tuple[int, ...]
    action_dtype: str

    def fields(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        t, n = self.length, self.num_envs
        return {
            "obs": ((t + 1, n, *self.obs_shape), np.dtype(self.obs_dtype)),  # [t]: the last bootstraps
            "actions": ((t, n, *self.action_shape), np.dtype(self.action_dtype)),
            "logprobs": ((t, n), np.dtype(np.float32)),  # log mu(a|x) of the policy that acted
            "rewards": ((t, n), np.dtype(np.float32)),
            "terminated": ((t, n), np.dtype(np.bool_)),
            "truncated": ((t, n), np.dtype(np.bool_)),
            "valid": ((t, n), np.dtype(np.bool_)),  # False: the autoreset step after an episode end
            "episode_return": ((t, n), np.dtype(np.float32)),  # NaN but where an episode ended
            "episode_length": ((t, n), np.dtype(np.int32)),
        }

    def offsets(self) -> tuple[dict[str, int], int]:
        """Byte offset of each field in a slot (8-byte aligned), and the slot's size."""
        out, at = {}, 0
        for name, (shape, dtype) in self.fields().items():
            out[name] = at
            at += -(-int(np.prod(shape)) * dtype.itemsize // 8) * 8
        return out, at


class TrajectoryRing:
    """``num_actors * slots_per_actor`` trajectory slots in shared memory; see the module doc.

    Made by the learner with a multiprocessing context and handed to each actor process
    whole (pickled once, at its start: the shared arrays travel as file descriptors).
    """

    def __init__(self, layout: TrajectoryLayout, num_actors: int, slots_per_actor: int, ctx: Any) -> None:
        self.layout, self.num_actors, self.slots_per_actor = layout, num_actors, slots_per_actor
        self.num_slots = num_actors * slots_per_actor
        self.offsets, self.slot_bytes = layout.offsets()
        self._data = ctx.RawArray("b", max(1, self.num_slots * self.slot_bytes))
        self._header = ctx.RawArray("q", self.num_slots * len(HEADER))
        self._views: list[dict[str, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_views": None}

    def owned(self, actor: int) -> list[int]:
        """The slots ``actor`` writes."""
        first = actor * self.slots_per_actor
        return list(range(first, first + self.slots_per_actor))

    def owner(self, slot: int) -> int:
        return slot // self.slots_per_actor

    def slot(self, index: int) -> dict[str, np.ndarray]:
        """Numpy views of slot ``index``'s arrays (writing them writes the shared memory)."""
        if self._views is None:
            fields = self.layout.fields()
            self._views = [
                {name: self._field(k, name, shape, dtype) for name, (shape, dtype) in fields.items()}
                for k in range(self.num_slots)
            ]
        return self._views[index]

    def _field(self, slot: int, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        start = slot * self.slot_bytes + self.offsets[name]
        raw = np.frombuffer(self._data, dtype=np.uint8)[start : start + int(np.prod(shape)) * dtype.itemsize]
        return raw.view(dtype).reshape(shape)

    def _bytes(self, index: int) -> np.ndarray:
        return np.frombuffer(self._data, dtype=np.uint8)[
            index * self.slot_bytes : (index + 1) * self.slot_bytes
        ]

    def header(self, index: int) -> dict[str, int]:
        h = np.frombuffer(self._header, dtype=np.int64)[index * len(HEADER) : (index + 1) * len(HEADER)]
        return dict(zip(HEADER, h.tolist()))

    def seal(self, index: int, *, version: int, actor: int, seq: int) -> int:
        """The writer's last act on a filled slot: its header, with the CRC32 of its bytes."""
        crc = zlib.crc32(self._bytes(index))
        h = np.frombuffer(self._header, dtype=np.int64)
        h[index * len(HEADER) : (index + 1) * len(HEADER)] = (version, actor, seq, crc)
        return crc

    def raw(self, index: int) -> np.ndarray:
        """Slot ``index``'s bytes (what its CRC covers), as a view: a whole trajectory to ship."""
        return self._bytes(index)

    def store(self, index: int, data: np.ndarray, *, version: int, actor: int, seq: int, crc: int) -> None:
        """Write a trajectory sealed elsewhere (its bytes and header, the sender's CRC kept):
        how a pool whose actors have no shared memory with the learner fills its local ring;
        :meth:`verify` then checks the bytes against the CRC the actor computed."""
        np.copyto(self._bytes(index), np.frombuffer(data, dtype=np.uint8))
        h = np.frombuffer(self._header, dtype=np.int64)
        h[index * len(HEADER) : (index + 1) * len(HEADER)] = (version, actor, seq, crc)

    def verify(self, index: int) -> int:
        """The slot's CRC32, recomputed; raises if it is not the one its writer sealed."""
        crc = zlib.crc32(self._bytes(index))
        if crc != self.header(index)["crc"]:
            raise RuntimeError(f"trajectory slot {index} changed after it was sent (CRC mismatch)")
        return crc


class WeightBuffer:
    """A float32 vector one process publishes and others read whole; see the module doc."""

    def __init__(self, size: int, ctx: Any) -> None:
        self.size = size
        self._seq = ctx.RawArray("q", 2)  # [sequence (odd while writing), CRC32 of the vector]
        self._data = ctx.RawArray("f", max(1, size))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.frombuffer(self._seq, dtype=np.int64), np.frombuffer(self._data, dtype=np.float32)[
            : self.size
        ]

    @property
    def version(self) -> int:
        """How many vectors were published (0: none yet)."""
        return int(self._arrays()[0][0]) // 2

    def publish(self, vector: np.ndarray) -> int:
        """Write a new vector (the only writer); return its version."""
        seq, data = self._arrays()
        start = int(seq[0])
        seq[0] = start + 1  # odd: readers wait
        np.copyto(data, np.asarray(vector, np.float32).reshape(-1))
        seq[1] = zlib.crc32(data)
        seq[0] = start + 2
        return (start + 2) // 2

    def read(self, out: np.ndarray, newer_than: int = -1, timeout: float = 10.0) -> int | None:
        """Copy the vector into ``out`` if its version is above ``newer_than``; return the
        version copied, or None (nothing newer). Retries while a write is under way."""
        seq, data = self._arrays()
        deadline = time.monotonic() + timeout
        while True:
            before = int(seq[0])
            if before // 2 <= newer_than and not before & 1:
                return None
            if not before & 1:
                np.copyto(out, data)
                crc = int(seq[1])
                if int(seq[0]) == before and zlib.crc32(out) == crc:
                    return before // 2
            if time.monotonic() > deadline:
                raise TimeoutError("the weight buffer stayed mid-write (its writer died while publishing?)")
            time.sleep(0)


def receive_all(conn: Connection) -> list[bytes]:
    """Every message waiting on ``conn`` (raises EOFError once its other end is gone)."""
    out = [conn.recv_bytes()]
    while conn.poll():
        out.append(conn.recv_bytes())
    return out

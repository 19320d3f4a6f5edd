"""Per-env readers and writers over batched shared-memory views.

gymnasium's ``write_to_shared_memory`` rebuilds a numpy view on every call; the step loop
writes one observation per env per step, so the views are built once here and reused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import write_to_shared_memory

_BASE = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def is_flat_batchable(space: spaces.Space) -> bool:
    """True when every leaf of ``space`` is a fixed-shape numpy array (fast path)."""
    if isinstance(space, _BASE):
        return True
    if isinstance(space, spaces.Dict):
        return all(is_flat_batchable(s) for s in space.spaces.values())
    if isinstance(space, spaces.Tuple):
        return all(is_flat_batchable(s) for s in space.spaces)
    return False


def make_writer(space: spaces.Space, views: Any, shm: Any) -> Callable[[int, Any], None]:
    """Return ``write(i, value)`` storing one env's value into slot ``i`` of ``views``."""
    if not is_flat_batchable(space):
        return lambda i, value: write_to_shared_memory(space, i, value, shm)
    return _fast_writer(space, views)


def _fast_writer(space: spaces.Space, views: Any) -> Callable[[int, Any], None]:
    if isinstance(space, _BASE):

        def write(i: int, value: Any) -> None:
            views[i] = value

        return write
    if isinstance(space, spaces.Dict):
        subs = [(key, _fast_writer(sub, views[key])) for key, sub in space.spaces.items()]

        def write_dict(i: int, value: Any) -> None:
            for key, sub_write in subs:
                sub_write(i, value[key])

        return write_dict
    subs_t = [_fast_writer(sub, views[k]) for k, sub in enumerate(space.spaces)]

    def write_tuple(i: int, value: Any) -> None:
        for k, sub_write in enumerate(subs_t):
            sub_write(i, value[k])

    return write_tuple


def make_reader(space: spaces.Space, views: Any, copy: bool = False) -> Callable[[int], Any]:
    """Return ``read(i)`` giving env ``i``'s value, shaped as gymnasium's ``iterate`` yields it."""
    if isinstance(space, _BASE):
        if copy:
            return lambda i: views[i].copy()  # a numpy scalar stays a scalar
        return lambda i: views[i]
    if isinstance(space, spaces.Dict):
        subs = [(key, make_reader(sub, views[key], copy)) for key, sub in space.spaces.items()]
        return lambda i: {key: read(i) for key, read in subs}
    if isinstance(space, spaces.Tuple):
        subs_t = [make_reader(sub, views[k], copy) for k, sub in enumerate(space.spaces)]
        return lambda i: tuple(read(i) for read in subs_t)
    raise TypeError(f"no fast reader for {type(space).__name__}")


def assign_batch(space: spaces.Space, views: Any, values: Any, index: Any = slice(None)) -> None:
    """Copy a batch of values (as ``space`` batches them) into ``views[index]``."""
    if isinstance(space, _BASE):
        values = np.asarray(values)
        target = views[index]
        if values.shape != target.shape:
            raise ValueError(f"actions have shape {values.shape}, expected {target.shape} for {space}")
        views[index] = values
    elif isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            assign_batch(sub, views[key], values[key], index)
    else:
        for k, sub in enumerate(space.spaces):
            assign_batch(sub, views[k], values[k], index)


def gather_batch(space: spaces.Space, views: Any, index: np.ndarray) -> Any:
    """Copy the rows ``index`` out of batched views (fancy indexing copies)."""
    if isinstance(space, _BASE):
        return views[index]
    if isinstance(space, spaces.Dict):
        return {key: gather_batch(sub, views[key], index) for key, sub in space.spaces.items()}
    return tuple(gather_batch(sub, views[k], index) for k, sub in enumerate(space.spaces))

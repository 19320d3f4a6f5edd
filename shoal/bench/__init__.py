"""Benchmarks shipped with shoal (``shoal bench ...``); thin runners live in ``benchmarks/``."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Any


def machine(*packages: str) -> dict[str, Any]:
    """What a result depends on: cores, platform, Python and the versions of ``packages``
    (None for one that is not installed), recorded in every benchmark's JSON."""
    out: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for name in packages:
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out

"""Shared aliases: the small vocabulary every layer may use."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeAlias

__all__ = ["Clock", "JsonValue", "system_clock"]

#: A clock returns seconds since the Unix epoch. Injected everywhere a timestamp is taken,
#: so that tests and replays can be deterministic.
Clock: TypeAlias = Callable[[], float]

JsonValue: TypeAlias = Any


def system_clock() -> float:
    """The wall clock, in seconds since the Unix epoch."""
    return time.time()

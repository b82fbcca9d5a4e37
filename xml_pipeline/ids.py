"""Identifiers: unique, roughly time-ordered, URL- and XML-safe.

Message and thread ids are ULID-style: 26 characters of Crockford base32, the first ten
encoding the millisecond timestamp and the rest randomness. Ids made by one
``IdFactory`` are strictly increasing, even within one millisecond.
"""

from __future__ import annotations

import os

from xml_pipeline.types import Clock, system_clock

__all__ = ["IdFactory", "is_id"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1


# Two characters (10 bits) at a time: 13 table look-ups for the 130 bits of 26 characters.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_SHIFTS = tuple(range(120, -1, -10))


def _encode(value: int) -> str:
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def is_id(text: str) -> bool:
    """True if ``text`` has the shape of an id made here (26 Crockford base32 characters)."""
    return len(text) == 26 and all(c in _ALPHABET for c in text)


_POOL_BYTES = 10 * 410  # the randomness of 410 ids, read from the OS at once


class _Pool:
    """Bytes from ``os.urandom``, handed out ten at a time: one system call per 410 ids
    rather than one per id. A forked child starts a fresh pool, so that parent and child
    never hand out the same bytes."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.data, self.offset = b"", 0

    def take(self) -> int:
        offset = self.offset
        if offset >= len(self.data):
            self.data, offset = os.urandom(_POOL_BYTES), 0
        self.offset = offset + 10
        return int.from_bytes(self.data[offset:offset + 10], "big")


_pool = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.reset)


class IdFactory:
    """Makes monotonic ULID-style ids from a clock and the OS random source."""

    def __init__(self, *, clock: Clock = system_clock) -> None:
        self._clock = clock
        self._last = 0

    def new(self) -> str:
        millis = int(self._clock() * 1000) & ((1 << 48) - 1)
        value = (millis << _RANDOM_BITS) | _pool.take()
        if value <= self._last:
            # Same millisecond (or a clock that went back): keep strict order.
            value = self._last + 1
        self._last = value
        return _encode(value)

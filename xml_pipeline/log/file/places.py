"""Where records are in a file log's segments, for the records the log knows without reading.

The log learns a place from each write (the last record of it: the writer knows where it put
it) and from each snapshot it hands out (the record the snapshot includes). A reader starts
at a known place instead of scanning a segment from its start; a snapshot finds its record
from the nearest place before it. A wrong place is harmless: whoever uses one checks the frame
it finds there. Used on the event loop only.
"""

from __future__ import annotations

__all__ = ["Places"]

_SIZE = 1024  # places remembered; the oldest are forgotten first


class Places:
    def __init__(self, *, size: int = _SIZE) -> None:
        self._size = size
        #: position -> (segment name, offset of its frame, chain hash), oldest learnt first
        self._known: dict[int, tuple[str, int, bytes]] = {}

    def remember(self, position: int, segment: str, offset: int, digest: bytes) -> None:
        known = self._known
        known[position] = (segment, offset, digest)
        if len(known) > self._size:
            del known[next(iter(known))]

    def get(self, position: int) -> tuple[str, int, bytes] | None:
        """``(segment name, offset, chain hash)`` of the record at ``position``, if known."""
        return self._known.get(position)

    def start(self, position: int) -> tuple[str, int] | None:
        """``(segment name, offset)`` where the record at ``position`` starts, if known."""
        known = self._known.get(position)
        return None if known is None else known[:2]

    def before(self, position: int) -> tuple[str, int] | None:
        """``(segment name, offset)`` of the nearest known record at or before ``position``."""
        best = max((p for p in self._known if p <= position), default=None)
        return None if best is None else self._known[best][:2]

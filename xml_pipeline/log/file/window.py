"""The records this process appended lately, kept for ``FileLog.follow``.

A follower of the writing process (the pump's own ledger among them) is near the end of the
log; reading back and decoding what this process has just written would cost it as much as
writing it. The window keeps the very events that were appended, by position, for the most
recent durable records (at least ``records`` of them, unless they take more than ``size``
bytes of frames); a follower that falls behind it reads from the segments instead. Records
enter once durable, so a batch that failed never does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from xml_pipeline.events import Event
from xml_pipeline.log.file.writer import Batch

__all__ = ["Window"]

_RECORDS = 4096
_BYTES = 4 * 1024 * 1024


class Window:
    def __init__(self, *, first: int, records: int = _RECORDS, size: int = _BYTES) -> None:
        self.first = first  # the position of ``_events[0]`` (the next one, while empty)
        self._events: list[Event] = []
        self._records = records
        self._size = size
        self._bytes = 0
        self._writes: deque[tuple[int, int]] = deque()  # (last position, bytes), in order
        # Trim in steps, so that the list is cut once every so many records, not at each add.
        self._most_records = 2 * records
        self._most_bytes = 2 * size

    def add(self, batches: Sequence[Batch]) -> None:
        """Hold the events of ``batches``, one durable write, the records after those held."""
        held = self._events
        if batches[0].first_position != self.first + len(held):  # not the next records
            held.clear()
            self._writes.clear()
            self._bytes = 0
            self.first = batches[0].first_position
        size = 0
        for batch in batches:
            held.extend(batch.events)
            size += len(batch.data)
        self._bytes += size
        self._writes.append((self.first + len(held) - 1, size))
        if len(held) > self._most_records or self._bytes > self._most_bytes:
            self._trim()

    def _trim(self) -> None:
        first, end = self.first, self.first + len(self._events)
        while self._writes and (end - first > self._records or self._bytes > self._size):
            last, dropped = self._writes.popleft()
            self._bytes -= dropped
            first = last + 1
        del self._events[:first - self.first]
        self.first = first

    def get(self, position: int) -> Event | None:
        """The event at ``position``, if held."""
        index = position - self.first
        return self._events[index] if 0 <= index < len(self._events) else None

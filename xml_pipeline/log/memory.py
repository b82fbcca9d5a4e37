"""An in-memory ``EventLog`` for tests: same contract, no durability.

Events go through the same mapper as the durable logs (``encode`` then ``decode``), so what a
test reads back is what it would read from a file, and an event outside the catalogue is
refused here too. Snapshots are kept in memory, the newest two, so that the code that takes
and uses them runs on this log too; ``probe`` returns at once, since an append never fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from xml_pipeline.errors import LogClosedError
from xml_pipeline.events import Event, Recorded, decode, encode
from xml_pipeline.log.statistics import LogStatistics

__all__ = ["MemoryLog", "MemorySnapshots"]


class MemorySnapshots:
    """The ``Snapshots`` of a ``MemoryLog``: the newest ``keep``, in memory."""

    def __init__(self, log: MemoryLog, *, keep: int = 2) -> None:
        self._log = log
        self._keep = keep
        self._saved: dict[int, bytes] = {}

    async def latest(self, *, upto: int | None = None) -> tuple[int, bytes] | None:
        last = self._log.last_position if upto is None else min(upto, self._log.last_position)
        position = max((p for p in self._saved if p <= last), default=None)
        return None if position is None else (position, self._saved[position])

    async def save(self, position: int, state: bytes) -> bool:
        if not 1 <= position <= self._log.last_position:
            return False
        self._saved[position] = bytes(state)
        for old in sorted(self._saved)[:-self._keep]:
            del self._saved[old]
        return True


class MemoryLog:
    def __init__(self) -> None:
        self._records: list[Recorded] = []
        self._signal = asyncio.Event()
        self._closed = False
        self._batches = 0
        self._largest = 0
        self._snapshots = MemorySnapshots(self)

    @property
    def last_position(self) -> int:
        return len(self._records)

    @property
    def snapshots(self) -> MemorySnapshots:
        return self._snapshots

    async def probe(self) -> None:
        return None

    @property
    def exclusive(self) -> bool:
        return True

    async def append(self, events: Sequence[Event]) -> list[int]:
        return await self.append_nowait(events)

    def append_nowait(self, events: Sequence[Event]) -> asyncio.Future[list[int]]:
        if self._closed:
            raise LogClosedError("The log is closed; open it again to append.")
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        if not events:
            future.set_result([])
            return future
        # Keep what a durable log would give back: the decoded stored form. Encoding first
        # also refuses, as every backend does, an event outside the catalogue.
        stored = [decode(*encode(event)) for event in events]
        start = len(self._records) + 1
        positions = list(range(start, start + len(stored)))
        self._records.extend(Recorded(p, e) for p, e in zip(positions, stored, strict=True))
        self._batches += 1
        self._largest = max(self._largest, len(events))
        self._notify()
        future.set_result(positions)
        return future

    def _notify(self) -> None:
        self._signal.set()
        self._signal = asyncio.Event()

    async def read(self, after: int = 0) -> AsyncIterator[Recorded]:
        index = max(after, 0)
        while index < len(self._records):
            yield self._records[index]
            index += 1

    async def follow(self, after: int = 0) -> AsyncIterator[Recorded]:
        index = max(after, 0)
        while True:
            while index < len(self._records):
                yield self._records[index]
                index += 1
            if self._closed:
                return
            await self._signal.wait()

    def statistics(self) -> LogStatistics:
        return LogStatistics(
            last_position=len(self._records),
            appended=len(self._records),
            batches=self._batches,
            fsyncs=0,
            largest_batch=self._largest,
            bytes_written=0,
        )

    async def aclose(self) -> None:
        self._closed = True
        self._notify()

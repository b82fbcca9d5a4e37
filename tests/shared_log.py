"""A second ``EventLog`` implementation for tests: one log with several writers.

``SharedLog.connect()`` gives a handle; every handle appends to, reads and follows the same
records, the way several processes share one JetStream stream. Positions are given in the order
the appends are made, across handles; an append becomes durable (its future done, followers
woken) one loop turn later, so a writer never sees its own records before another's that came
first. It passes the shared contract suite (``tests/test_log_contract.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from xml_pipeline.errors import LogClosedError
from xml_pipeline.events import Event, Recorded, decode, encode
from xml_pipeline.log import LogStatistics
from xml_pipeline.log.memory import MemorySnapshots

__all__ = ["SharedLog"]


class SharedLog:
    """The records, and the handles that write to them."""

    def __init__(self) -> None:
        self.records: list[Recorded] = []
        self.durable = 0  # records before this index are durable
        self.changed = asyncio.Event()

    def connect(self) -> SharedHandle:
        return SharedHandle(self)

    def _made_durable(self, upto: int, future: asyncio.Future[list[int]],
                      positions: list[int]) -> None:
        self.durable = max(self.durable, upto)
        self.changed.set()
        self.changed = asyncio.Event()
        if not future.done():
            future.set_result(positions)


class SharedHandle:
    """One writer's connection to a ``SharedLog``."""

    def __init__(self, shared: SharedLog) -> None:
        self._shared = shared
        self._closed = False
        self._appended = 0
        self._batches = 0
        self._largest = 0
        self._snapshots = MemorySnapshots(self)

    @property
    def last_position(self) -> int:
        return self._shared.durable

    @property
    def exclusive(self) -> bool:
        return False  # other handles append too

    @property
    def snapshots(self) -> MemorySnapshots:
        return self._snapshots

    async def probe(self) -> None:
        return None

    async def append(self, events: Sequence[Event]) -> list[int]:
        return await self.append_nowait(events)

    def append_nowait(self, events: Sequence[Event]) -> asyncio.Future[list[int]]:
        if self._closed:
            raise LogClosedError("The log is closed; open it again to append.")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        if not events:
            future.set_result([])
            return future
        stored = [decode(*encode(event)) for event in events]
        records = self._shared.records
        start = len(records) + 1
        positions = list(range(start, start + len(stored)))
        records.extend(Recorded(p, e) for p, e in zip(positions, stored, strict=True))
        self._appended += len(stored)
        self._batches += 1
        self._largest = max(self._largest, len(stored))
        loop.call_soon(self._shared._made_durable, len(records), future, positions)
        return future

    async def read(self, after: int = 0) -> AsyncIterator[Recorded]:
        index = max(after, 0)
        while index < self._shared.durable:
            yield self._shared.records[index]
            index += 1

    async def follow(self, after: int = 0) -> AsyncIterator[Recorded]:
        index = max(after, 0)
        while True:
            while index < self._shared.durable:
                yield self._shared.records[index]
                index += 1
            if self._closed:
                return
            await self._shared.changed.wait()

    def statistics(self) -> LogStatistics:
        return LogStatistics(last_position=self._shared.durable, appended=self._appended,
                             batches=self._batches, fsyncs=0, largest_batch=self._largest,
                             bytes_written=0)

    async def aclose(self) -> None:
        self._closed = True
        shared = self._shared
        shared.changed.set()
        shared.changed = asyncio.Event()

"""The append-only event log: the source of truth.

``EventLog`` is the contract every backend meets (memory for tests, file by default, NATS
JetStream to scale out); one shared contract test suite runs against each.

- ``append(events)`` makes the events durable according to the backend's policy and returns
  their positions (consecutive, starting at 1 for a new log). It returns only once durable.
- ``append_nowait(events)`` gives the events their positions at once (so successive calls
  are ordered as they were made) and returns a future of the positions, done once durable.
- ``read(after)`` yields every record with a position greater than ``after`` that exists when
  the read reaches it, in order, then ends.
- ``follow(after)`` does the same and then keeps yielding new records as they are appended,
  by this process or another one, until cancelled or the log is closed.
- ``last_position`` is the position of the last durable record (0 for an empty log).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from xml_pipeline.events import Event, Recorded

__all__ = ["EventLog", "LogStatistics"]

from xml_pipeline.log.statistics import LogStatistics


@runtime_checkable
class EventLog(Protocol):
    @property
    def last_position(self) -> int: ...

    async def append(self, events: Sequence[Event]) -> list[int]: ...

    def append_nowait(self, events: Sequence[Event]) -> asyncio.Future[list[int]]: ...

    def read(self, after: int = 0) -> AsyncIterator[Recorded]: ...

    def follow(self, after: int = 0) -> AsyncIterator[Recorded]: ...

    def statistics(self) -> LogStatistics: ...

    async def aclose(self) -> None: ...

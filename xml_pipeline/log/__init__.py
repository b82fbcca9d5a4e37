"""The append-only event log: the source of truth.

``EventLog`` is the contract every backend meets (memory for tests, file by default, NATS
JetStream to scale out); one shared contract test suite runs against each, and the runtime
knows no more of a log than this protocol. ``open_log`` opens the backend an organism's log
settings name.

- ``append(events)`` makes the events durable according to the backend's policy and returns
  their positions (consecutive, starting at 1 for a new log). It returns only once durable.
- ``append_nowait(events)`` gives the events their positions at once (so successive calls
  are ordered as they were made) and returns a future of the positions, done once durable.
- ``read(after)`` yields every record with a position greater than ``after`` that exists when
  the read reaches it, in order, then ends.
- ``follow(after)`` does the same and then keeps yielding new records as they are appended,
  by this process or another one, until cancelled or the log is closed. It yields durable
  records only.
- ``last_position`` is the position of the last durable record (0 for an empty log).
- ``probe()`` returns once the log can be written again after a failed append, and raises
  while it cannot (a log that cannot be written at all, read-only say, always raises).
- ``exclusive`` says whether this handle is the log's only writer (the file log's lock makes
  it so; the memory log lives in one process). Where it is not (a stream several processes
  append to), a holder waits until the fold has its lease before it acts on it, since
  another writer's claim may come first in the log.
- ``snapshots`` keeps encoded states of the log's records, where the backend keeps them (files
  next to the segments; memory for the memory log): ``Snapshots``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from xml_pipeline.config import LogConfig
from xml_pipeline.errors import LogError
from xml_pipeline.events import Event, Recorded
from xml_pipeline.log.statistics import LogStatistics

__all__ = ["EventLog", "LogStatistics", "Snapshots", "open_log"]


class Snapshots(Protocol):
    """Encoded states, each of the records up to a position of its log. An optimisation only:
    a snapshot is used only while its log holds that very record, so that replaying the rest
    from it gives the state a replay from position 0 gives."""

    async def latest(self, *, upto: int | None = None) -> tuple[int, bytes] | None:
        """``(position, state)`` of the newest snapshot that still matches its log and is
        not past ``upto``; None if there is none."""
        ...

    async def save(self, position: int, state: bytes) -> bool:
        """Keep ``state``, encoded, of the records up to ``position`` (older ones may go).
        Returns False, keeping nothing, if the log lacks the record at ``position``; raises
        ``LogError`` if it cannot be kept."""
        ...


@runtime_checkable
class EventLog(Protocol):
    @property
    def last_position(self) -> int: ...

    @property
    def snapshots(self) -> Snapshots: ...

    @property
    def exclusive(self) -> bool: ...

    async def append(self, events: Sequence[Event]) -> list[int]: ...

    def append_nowait(self, events: Sequence[Event]) -> asyncio.Future[list[int]]: ...

    def read(self, after: int = 0) -> AsyncIterator[Recorded]: ...

    def follow(self, after: int = 0) -> AsyncIterator[Recorded]: ...

    async def probe(self) -> None: ...

    def statistics(self) -> LogStatistics: ...

    async def aclose(self) -> None: ...


async def open_log(settings: LogConfig, *, readonly: bool = False) -> EventLog:
    """Open the log that ``settings`` (an organism's ``log``) describe: the file log in
    ``settings.path``, created if needed (``readonly``: for reading only, by any number of
    processes while one writes). Raises ``LogError`` if it cannot be opened, with the
    backend's subclasses (``LogLockedError``, ``LogDamagedError``)."""
    if settings.url is not None:
        raise LogError(f"The log at {settings.url} would be a NATS JetStream log, which this "
                       "version of xml-pipeline does not have yet; set organism.log.path "
                       "to use a file log instead.")
    if settings.path is None:
        raise LogError("The organism names no log; set organism.log.path.")
    from xml_pipeline.log.file import open_file_log

    return await open_file_log(settings.path, fsync=settings.fsync,
                               segment_bytes=settings.segment_bytes, readonly=readonly)

"""The file log's writer: the one thread that owns the segment file descriptor.

Batches are submitted from the event loop in position order; the thread writes every batch
that arrived while it was busy in one write (group commit under ``batch``; one by one under
``always``), fsyncs as the policy says, rotates segments, and hands each batch back to the
loop (``on_durable(batches, error)``) with the place of its last record. A write or fsync
that fails fails that batch and every one behind it with ``LogWriteError`` until the loop
resets the writer (``reset_failure``) or a ``probe`` shows the disk works again.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from xml_pipeline.errors import LogWriteError
from xml_pipeline.events import Event
from xml_pipeline.log.file.segments import segment_name

__all__ = ["Batch", "Writer", "fsync_directory"]


class Batch:
    """One append: its events and their frames, and where its last record went once written
    (``place``)."""

    __slots__ = ("events", "data", "count", "last_position", "last_hash", "last_offset",
                 "future", "first_position", "place")

    def __init__(self, events: Sequence[Event], data: bytes, count: int, last_position: int,
                 last_hash: bytes, future: asyncio.Future[list[int]], first_position: int,
                 last_offset: int = 0) -> None:
        self.events = events
        self.data = data
        self.count = count
        self.last_position = last_position
        self.last_hash = last_hash
        self.last_offset = last_offset  # where the last record's frame starts in ``data``
        self.future = future
        self.first_position = first_position
        #: (segment name, offset) of the last record's frame, set by the writer once written
        self.place: tuple[str, int] | None = None


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """The thread that owns the segment file descriptor: writes, fsyncs and rotates."""

    def __init__(self, *, directory: Path, fsync: str, segment_bytes: int,
                 loop: asyncio.AbstractEventLoop, segment: Path | None, size: int,
                 durable_position: int, durable_hash: bytes, on_durable: object) -> None:
        self.directory = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.loop = loop
        self.segment = segment
        self.size = size
        self.durable_position = durable_position
        self.durable_hash = durable_hash
        self.failure: BaseException | None = None
        self._on_durable = on_durable
        self._fd: int | None = None
        self._dirty = False  # a failed write may have left bytes past ``size``
        self._queue: list[Batch] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.batches = 0
        self.fsyncs = 0
        self.largest_batch = 0
        self.bytes_written = 0
        self.in_flight = 0
        self._thread = threading.Thread(target=self._run, name="xml-pipeline-log-writer",
                                        daemon=True)
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        with self._cond:
            self._queue.append(batch)
            self.in_flight += 1
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue and self._stopping:
                    return
                taken, self._queue = self._queue, []
            if self.fsync == "always":
                for batch in taken:
                    self._commit([batch])
            else:
                self._commit(taken)

    def _open_segment(self, first_position: int) -> None:
        if self._fd is not None and self.size < self.segment_bytes:
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.segment is None or self.size >= self.segment_bytes:
            path, size, created = self.directory / segment_name(first_position), 0, True
        else:
            path, size, created = self.segment, self.size, False
        # O_CREAT even when reopening: a failed rotation may have left no file behind.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if self._dirty or created:
                # Anything past the last durable record is left over from a failed write.
                os.ftruncate(fd, size)
            if created and self.fsync != "never":
                fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.segment, self.size = fd, path, size
        self._dirty = False

    def _commit(self, batches: list[Batch]) -> None:
        if self.failure is not None:
            self._finish(batches, self.failure)
            return
        first = batches[0].last_position - batches[0].count + 1
        data = b"".join(b.data for b in batches) if len(batches) > 1 else batches[0].data
        try:
            self._open_segment(first)
            assert self._fd is not None
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync != "never":
                os.fdatasync(self._fd)
                self.fsyncs += 1
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about it
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.failure = LogWriteError(
                f"The event log could not be written ({reason}); nothing in this "
                "batch was acknowledged. Free space or fix the disk, then retry."
            )
            self.failure.__cause__ = exc
            # Cut whatever part of the batch reached the file, so the tail stays clean; if
            # that fails too, the next attempt cuts it before writing.
            self._dirty = True
            if self._fd is not None:
                with suppress(OSError):
                    os.ftruncate(self._fd, self.size)
            self._finish(batches, self.failure)
            return
        assert self.segment is not None
        offset = self.size
        for batch in batches:
            batch.place = (self.segment.name, offset + batch.last_offset)
            offset += len(batch.data)
        self.size += len(data)
        self.bytes_written += len(data)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, sum(b.count for b in batches))
        self.durable_position = batches[-1].last_position
        self.durable_hash = batches[-1].last_hash
        self._finish(batches, None)

    def _finish(self, batches: list[Batch], error: BaseException | None) -> None:
        with self._cond:
            self.in_flight -= len(batches)
        try:
            self.loop.call_soon_threadsafe(self._on_durable, batches, error)  # type: ignore[arg-type]
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def probe(self) -> None:
        """Check, from the caller's thread while nothing is in flight, that the disk takes a
        write and an fsync: cut the segment back to its durable size, write one byte, sync,
        cut it off again, sync. Raises ``LogWriteError``; on success the writer is usable."""
        with self._cond:
            if self.in_flight:
                raise LogWriteError("The log is still finishing a write; probe again later.")
            try:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self._open_segment(self.durable_position + 1)
                assert self._fd is not None
                os.ftruncate(self._fd, self.size)
                os.write(self._fd, b"\0")
                os.fdatasync(self._fd)
                os.ftruncate(self._fd, self.size)
                os.fdatasync(self._fd)
            except OSError as exc:
                raise LogWriteError(f"The event log still cannot be written "
                                    f"({exc.strerror or exc}).") from exc
            self.failure = None

    def reset_failure(self) -> bool:
        """Forget a failure once nothing is in flight; True if the writer is usable again."""
        with self._cond:
            if self.in_flight:
                return False
            self.failure = None
            if self._fd is not None:
                with suppress(OSError):
                    os.close(self._fd)
                self._fd = None
            return True

"""The default event log: segment files on the local disk, group-committed by a writer thread.

Guarantees:

- ``append`` returns only once its records reached the durability of the fsync policy:
  ``always`` (each append fsynced on its own), ``batch`` (group commit: every record that
  arrived while the previous fsync ran shares the next one) or ``never`` (written to the OS).
- One writer per directory (an exclusive ``flock``); any number of readers, in this process or
  others, may ``read``/``follow`` at the same time.
- Every open (for reading too) first checks the log (``integrity.check_log``: how the
  segments follow one another, every frame of the last one, every snapshot's anchor) and
  raises ``LogDamagedError`` naming the place if it fails, leaving the directory exactly as
  it was. Opening for writing then cuts off a torn tail (a frame never completely written);
  a whole frame that fails its checksum is damage and is never cut (``repair`` moves it
  aside). Damage inside a record in the middle of a sealed segment is found by
  ``verify_log`` and by any read that reaches it.
- A read-only log (another process tailing this one) sees records once they are written,
  which may be before the writer's fsync completes.
- If a write or fsync fails, the records of that batch and every batch behind it fail with
  ``LogWriteError``; nothing is acknowledged that is not durable. The next append tries again
  from the last durable record.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from pathlib import Path

from xml_pipeline.errors import LogClosedError, LogCorruptedError, LogLockedError, LogWriteError
from xml_pipeline.events import Event, Recorded, encode
from xml_pipeline.log.integrity import LogEnd, check_log
from xml_pipeline.log.segments import GENESIS, LogReader, make_frame, segment_name
from xml_pipeline.log.statistics import LogStatistics

__all__ = ["FileLog", "open_file_log"]

FSYNC_POLICIES = ("always", "batch", "never")
_POLL_INTERVAL = 0.05  # how often followers look for records written by other processes
_LOCATIONS = 1024  # batches whose last record's location the writer remembers


class _Batch:
    __slots__ = ("data", "count", "last_position", "last_hash", "last_offset", "future",
                 "first_position")

    def __init__(self, data: bytes, count: int, last_position: int, last_hash: bytes,
                 future: asyncio.Future[list[int]], first_position: int,
                 last_offset: int = 0) -> None:
        self.data = data
        self.count = count
        self.last_position = last_position
        self.last_hash = last_hash
        self.last_offset = last_offset  # where the last record's frame starts in ``data``
        self.future = future
        self.first_position = first_position


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer:
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
        self._queue: list[_Batch] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.batches = 0
        self.fsyncs = 0
        self.largest_batch = 0
        self.bytes_written = 0
        self.in_flight = 0
        #: position -> (segment name, offset, chain hash) of the last record of each of the
        #: latest batches written (what a snapshot needs, without reading the segment)
        self.locations: OrderedDict[int, tuple[str, int, bytes]] = OrderedDict()
        self._thread = threading.Thread(target=self._run, name="xml-pipeline-log-writer",
                                        daemon=True)
        self._thread.start()

    def submit(self, batch: _Batch) -> None:
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
                _fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.segment, self.size = fd, path, size
        self._dirty = False

    def _commit(self, batches: list[_Batch]) -> None:
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
            self.locations[batch.last_position] = (self.segment.name,
                                                   offset + batch.last_offset, batch.last_hash)
            offset += len(batch.data)
        while len(self.locations) > _LOCATIONS:
            self.locations.popitem(last=False)
        self.size += len(data)
        self.bytes_written += len(data)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, sum(b.count for b in batches))
        self.durable_position = batches[-1].last_position
        self.durable_hash = batches[-1].last_hash
        self._finish(batches, None)

    def _finish(self, batches: list[_Batch], error: BaseException | None) -> None:
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


class FileLog:
    """An ``EventLog`` on local segment files. Open with ``open_file_log``."""

    def __init__(self, directory: Path, *, readonly: bool, fsync: str, segment_bytes: int
                 ) -> None:
        self.directory = directory
        self.readonly = readonly
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.repaired_bytes = 0
        self._lock_fd: int | None = None
        self._writer: _Writer | None = None
        self._next_position = 1
        self._previous_hash = GENESIS
        self._durable = 0
        self._appended = 0
        self._changed = asyncio.Event()
        self._closed = False
        self._hints: dict[int, tuple[str, int]] = {}

    # -- opening

    def _lock(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise LogLockedError(
                f"The log at {self.directory} is being written by process {holder}; stop it "
                "first, or read this log without writing (tail, replay)."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        self._lock_fd = fd

    def _recover_tail(self) -> LogEnd:
        """Check the log (``check_log``: raises ``LogDamagedError``, changing nothing) and
        cut a torn tail off; say where the log ends."""
        end = check_log(self.directory)
        if end.torn is not None:
            path, offset = end.torn
            if offset == 0:  # the segment holds no whole record
                path.unlink()
                _fsync_directory(self.directory)
            else:
                with open(path, "r+b") as handle:
                    handle.truncate(offset)
                    handle.flush()
                    os.fsync(handle.fileno())
            self.repaired_bytes += end.torn_bytes
        return end

    async def _open(self) -> None:
        if self.readonly:
            if not self.directory.is_dir():
                raise LogCorruptedError(f"There is no log at {self.directory}.", position=0)
            self._durable = (await asyncio.to_thread(check_log, self.directory)).position
            return
        self._lock()
        await self._open_locked()

    async def _open_locked(self) -> None:
        """Open for writing once the lock is held; on failure, let go of it."""
        try:
            end = await asyncio.to_thread(self._recover_tail)
        except BaseException:
            self._unlock()
            raise
        self._next_position = end.position + 1
        self._previous_hash = end.chain_hash
        self._durable = end.position
        self._writer = _Writer(
            directory=self.directory, fsync=self.fsync, segment_bytes=self.segment_bytes,
            loop=asyncio.get_running_loop(), segment=end.segment, size=end.size,
            durable_position=end.position, durable_hash=end.chain_hash,
            on_durable=self._on_durable,
        )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def probe(self) -> None:
        """Raise ``LogWriteError`` unless the disk takes a write and an fsync now; on success,
        appends start again from the last durable record."""
        writer = self._writer
        if writer is None:
            raise LogWriteError(f"The log at {self.directory} was opened read-only.")
        await asyncio.to_thread(writer.probe)
        self._next_position = writer.durable_position + 1
        self._previous_hash = writer.durable_hash

    def seek_hint(self, position: int, segment: str, offset: int) -> None:
        """Remember that the record at ``position`` starts at ``segment``:``offset`` (a snapshot
        knows this), so that ``read(after=position)`` need not scan the segment from its start.
        A wrong hint is harmless: the reader checks every frame it reads."""
        self._hints[position] = (segment, offset)

    # -- the contract

    @property
    def last_position(self) -> int:
        return self._durable

    async def append(self, events: Sequence[Event]) -> list[int]:
        # No shield: a caller that stops waiting cancels only its own wait; the records are
        # written anyway (the writer skips futures that are already done).
        return await self.append_nowait(events)

    def append_nowait(self, events: Sequence[Event]) -> asyncio.Future[list[int]]:
        """Give the records their positions now and a future that resolves once they are
        durable. Records of successive calls are written in call order."""
        if self._closed:
            raise LogClosedError("The log is closed; open it again to append.")
        if self._writer is None:
            raise LogWriteError(f"The log at {self.directory} was opened read-only.")
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        if not events:
            future.set_result([])
            return future
        writer = self._writer
        if writer.failure is not None:
            if not writer.reset_failure():
                raise writer.failure
            # Start again from the last durable record: failed batches never happened.
            self._next_position = writer.durable_position + 1
            self._previous_hash = writer.durable_hash
        position = self._next_position
        previous = self._previous_hash
        frames = []
        for event in events:
            type_name, version, data = encode(event)
            frame, previous = make_frame(position=position, at=event.at, type_name=type_name,
                                         version=version, data=data, previous=previous)
            frames.append(frame)
            position += 1
        first = self._next_position
        self._next_position = position
        self._previous_hash = previous
        data = b"".join(frames)
        writer.submit(_Batch(data, len(frames), position - 1, previous, future, first,
                             len(data) - len(frames[-1])))
        return future

    def location(self, position: int) -> tuple[str, int, bytes] | None:
        """``(segment name, offset, chain hash)`` of the record at ``position`` if it is the
        last record of one of the latest batches written (else None: see ``locate_record``)."""
        writer = self._writer
        return None if writer is None else writer.locations.get(position)

    def _on_durable(self, batches: list[_Batch], error: BaseException | None) -> None:
        for batch in batches:
            if batch.future.done():
                continue
            if error is None:
                batch.future.set_result(list(range(batch.first_position,
                                                   batch.last_position + 1)))
            else:
                batch.future.set_exception(error)
        if error is None:
            self._durable = batches[-1].last_position
            self._appended += sum(b.count for b in batches)
            self._changed.set()
            self._changed = asyncio.Event()

    def _seen(self, position: int) -> None:
        # A read-only log learns of new records by reading them.
        if self.readonly and position > self._durable:
            self._durable = position

    async def read(self, after: int = 0) -> AsyncIterator[Recorded]:
        reader = LogReader(self.directory, after=after, start=self._hints.get(after))
        limit = None if self.readonly else self._durable
        count = 0
        for record in reader.read_available(limit=limit):
            self._seen(record.position)
            yield record
            count += 1
            if count % 4096 == 0:
                await asyncio.sleep(0)  # let the loop breathe during long replays

    async def follow(self, after: int = 0) -> AsyncIterator[Recorded]:
        reader = LogReader(self.directory, after=after, start=self._hints.get(after))
        while True:
            changed = self._changed
            limit = None if self.readonly else self._durable
            count = 0
            for record in reader.read_available(limit=limit):
                self._seen(record.position)
                yield record
                count += 1
                if count % 4096 == 0:
                    await asyncio.sleep(0)
            if self._closed:
                return
            # Wait unless this pass made progress and durable records remain: another
            # process's appends are only seen by polling, and a pass that found nothing
            # must never spin without yielding to the loop.
            if self.readonly or count == 0 or reader.next_position > self._durable:
                # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancellation
                # that lands in the same turn as the wake-up.
                with suppress(TimeoutError):
                    async with asyncio.timeout(_POLL_INTERVAL):
                        await changed.wait()

    def statistics(self) -> LogStatistics:
        writer = self._writer
        return LogStatistics(
            last_position=self._durable,
            appended=self._appended,
            batches=writer.batches if writer else 0,
            fsyncs=writer.fsyncs if writer else 0,
            largest_batch=writer.largest_batch if writer else 0,
            bytes_written=writer.bytes_written if writer else 0,
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            await asyncio.to_thread(self._writer.stop)
            self._writer = None
        self._unlock()
        self._changed.set()

    async def __aenter__(self) -> FileLog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_file_log(directory: str | Path, *, fsync: str = "batch",
                        segment_bytes: int = 64 * 1024 * 1024, readonly: bool = False
                        ) -> FileLog:
    """Open (creating if needed) the log in ``directory``; ``async with`` closes it.

    Raises ``LogLockedError`` if another process writes to it and ``LogDamagedError`` (a
    ``LogCorruptedError``) if it is damaged beyond a torn tail, read-only or not.
    """
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}.")
    log = FileLog(Path(directory), readonly=readonly, fsync=fsync, segment_bytes=segment_bytes)
    await log._open()
    return log

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
- ``follow`` on the writing log yields only durable records, in order; those this process
  appended lately come from memory (``window``, the very events appended), the rest from the
  segments.
- ``snapshots`` are files next to the segments (``snapshots``), checked on every open.
- If a write or fsync fails, the records of that batch and every batch behind it fail with
  ``LogWriteError``; nothing is acknowledged that is not durable. The next append tries again
  from the last durable record.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from pathlib import Path

from xml_pipeline.errors import LogClosedError, LogCorruptedError, LogLockedError, LogWriteError
from xml_pipeline.events import Event, Recorded, encode
from xml_pipeline.log.file.integrity import LogEnd, check_log
from xml_pipeline.log.file.places import Places
from xml_pipeline.log.file.reader import LogReader
from xml_pipeline.log.file.segments import GENESIS, make_frame
from xml_pipeline.log.file.snapshots import FileSnapshots
from xml_pipeline.log.file.window import Window
from xml_pipeline.log.file.writer import Batch, Writer, fsync_directory
from xml_pipeline.log.statistics import LogStatistics

__all__ = ["FSYNC_POLICIES", "FileLog", "open_file_log"]

FSYNC_POLICIES = ("always", "batch", "never")
_POLL_INTERVAL = 0.05  # how often followers look for records written by other processes


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
        self._writer: Writer | None = None
        self._next_position = 1
        self._previous_hash = GENESIS
        self._durable = 0
        self._appended = 0
        self._changed = asyncio.Event()
        self._closed = False
        self._places = Places()
        self._window = Window(first=1)
        self._snapshots = FileSnapshots(directory, self._places)

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
                fsync_directory(self.directory)
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
        self._window = Window(first=end.position + 1)
        self._writer = Writer(
            directory=self.directory, fsync=self.fsync, segment_bytes=self.segment_bytes,
            loop=asyncio.get_running_loop(), segment=end.segment, size=end.size,
            durable_position=end.position, durable_hash=end.chain_hash,
            on_durable=self._on_durable,
        )

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _restart(self, writer: Writer) -> None:
        """Go on from the last durable record: the batches that failed never happened."""
        self._next_position = writer.durable_position + 1
        self._previous_hash = writer.durable_hash

    # -- the contract

    async def probe(self) -> None:
        """Raise ``LogWriteError`` unless the disk takes a write and an fsync now (always, on
        a log opened read-only); on success, appends start again from the last durable
        record."""
        writer = self._writer
        if writer is None:
            raise LogWriteError(f"The log at {self.directory} was opened read-only.")
        await asyncio.to_thread(writer.probe)
        self._restart(writer)

    @property
    def snapshots(self) -> FileSnapshots:
        return self._snapshots

    @property
    def exclusive(self) -> bool:
        """True: a writable file log holds the directory's lock (a read-only one writes
        nothing)."""
        return True

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
            self._restart(writer)
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
        writer.submit(Batch(events, data, len(frames), position - 1, previous, future, first,
                            len(data) - len(frames[-1])))
        return future

    def location(self, position: int) -> tuple[str, int, bytes] | None:
        """``(segment name, offset, chain hash)`` of the record at ``position`` if the log
        knows it without reading: the last record of one of the latest writes, or the record
        of a snapshot it handed out (else None: see ``segments.locate_record``)."""
        return self._places.get(position)

    def _on_durable(self, batches: list[Batch], error: BaseException | None) -> None:
        last = batches[-1]
        if error is None and last.place is not None:
            # Where the write ended: from there, the place of any record written since is
            # found without reading much (``snapshots``).
            self._places.remember(last.last_position, *last.place, last.last_hash)
        for batch in batches:
            if batch.future.done():
                continue
            if error is None:
                batch.future.set_result(list(range(batch.first_position,
                                                   batch.last_position + 1)))
            else:
                batch.future.set_exception(error)
        if error is None:
            self._window.add(batches)
            self._durable = batches[-1].last_position
            self._appended += sum(b.count for b in batches)
            self._changed.set()
            self._changed = asyncio.Event()

    def _seen(self, position: int) -> None:
        # A read-only log learns of new records by reading them.
        if self.readonly and position > self._durable:
            self._durable = position

    async def read(self, after: int = 0) -> AsyncIterator[Recorded]:
        reader = LogReader(self.directory, after=after, start=self._places.start(after))
        limit = None if self.readonly else self._durable
        count = 0
        for record in reader.read_available(limit=limit):
            self._seen(record.position)
            yield record
            count += 1
            if count % 4096 == 0:
                await asyncio.sleep(0)  # let the loop breathe during long replays

    async def follow(self, after: int = 0) -> AsyncIterator[Recorded]:
        following = max(after, 0) + 1  # the position to yield next
        reader: LogReader | None = None
        while True:
            changed = self._changed
            count = 0
            # What this process appended lately, from memory: the events it was given.
            window = self._window
            while following <= self._durable and (event := window.get(following)) is not None:
                yield Recorded(following, event)
                following += 1
                count += 1
                if count % 4096 == 0:
                    await asyncio.sleep(0)
            # The rest from the segments, up to where the window starts: a follower behind
            # it, what preceded this process's appends, another process's records (read-only).
            limit = None if self.readonly else min(self._durable, window.first - 1)
            if limit is None or following <= limit:
                if reader is None or reader.next_position != following:
                    reader = LogReader(self.directory, after=following - 1,
                                       start=self._places.start(following - 1))
                for record in reader.read_available(limit=limit):
                    self._seen(record.position)
                    yield record
                    count += 1
                    if count % 4096 == 0:
                        await asyncio.sleep(0)
                following = reader.next_position
            if self._closed and (count == 0 or following > self._durable):
                return
            # Wait unless this pass made progress and durable records remain: another
            # process's appends are only seen by polling, and a pass that found nothing
            # must never spin without yielding to the loop.
            if self.readonly or count == 0 or following > self._durable:
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

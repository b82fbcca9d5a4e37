"""Reading a file log: a cursor over its segment files that yields complete records.

The reader checks every frame it reads (checksum, position) and decodes it; it never trusts
a hint about where to start beyond the frame it finds there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from xml_pipeline.errors import LogCorruptedError, RecordDecodeError
from xml_pipeline.events import Recorded, decode
from xml_pipeline.log.file.segments import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    damage_at,
    frame_at,
    good_frame_in,
    segments,
)

__all__ = ["LogReader"]

_CHUNK = 4 * 1024 * 1024
_SMALL_CHUNK = 64 * 1024


class LogReader:
    """A cursor over a log directory that reads complete frames as they appear.

    ``read_available()`` yields every record after the cursor that is complete on disk now,
    then stops; call it again later to continue. An incomplete frame at the very end is
    treated as not written yet; damage followed by more data (including a frame whose length
    runs past the end while a good frame follows it) raises ``LogCorruptedError``.
    """

    def __init__(self, directory: Path, *, after: int = 0,
                 start: tuple[str, int] | None = None) -> None:
        self.directory = directory
        self.next_position = max(after, 0) + 1
        # (segment name, offset) where the record at ``after`` starts, if the caller knows it
        # (a snapshot does): reading then starts there instead of at the segment's start.
        self._start = start
        self._segment: Path | None = None
        self._offset = 0  # just past the last complete frame read in ``_segment``
        self._following: tuple[int, Path] | None = None  # the segment after ``_segment``

    def _choose_segment(self) -> bool:
        """Move to the last segment that can hold ``next_position``; False if there is none.

        Choosing again after each pass (rather than looking only for a segment that starts
        exactly at ``next_position``) lets a cursor that starts beyond the end of the log
        skip whole segments written while it waited.
        """
        chosen = None
        self._following = None
        for first, path in segments(self.directory):
            if first <= self.next_position:
                chosen = (first, path)
            else:
                self._following = (first, path)
                break
        if chosen is None:
            return False
        if chosen[1] != self._segment:
            self._segment = chosen[1]
            self._offset = 0
            if self._start is not None and self._start[0] == chosen[1].name:
                self._offset = self._start[1]
            self._start = None
        return True

    def read_available(self, *, limit: int | None = None) -> Iterator[Recorded]:
        """Yield the complete records after the cursor (up to position ``limit``, if given)."""
        if not self._choose_segment():
            return
        reread = False
        while True:
            segment, before = self._segment, self.next_position
            yield from self._read_segment(limit)
            if limit is not None and self.next_position > limit:
                return
            if self._choose_segment() and self._segment != segment:
                reread = False
                continue
            following = self._following
            if following is None:
                return
            # A later segment exists, so this one was complete before it was created: read it
            # once more (it may have been finished since the pass above), then any record
            # still missing is a gap.
            if self.next_position != before or not reread:
                reread = True
                continue
            assert self._segment is not None
            raise LogCorruptedError(
                f"The log is damaged: {self._segment.name} ends before position "
                f"{self.next_position}, but the next segment {following[1].name} starts at "
                f"{following[0]}; run 'xml-pipeline replay --verify' for details.",
                position=self.next_position,
            )

    def _damaged(self, problem: str) -> LogCorruptedError:
        assert self._segment is not None
        return LogCorruptedError(
            f"The log is damaged at position {self.next_position} ({self._segment.name}: "
            f"{problem}); run 'xml-pipeline replay --verify' for details.",
            position=self.next_position,
        )

    def _read_segment(self, limit: int | None) -> Iterator[Recorded]:
        assert self._segment is not None
        segment = self._segment
        try:
            handle = open(segment, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return
        with handle:
            # Always start again from the end of the last complete frame: bytes of an
            # incomplete frame seen last time may since have been cut by a repair.
            handle.seek(self._offset)
            pending = b""
            while True:
                # Ask for no more than the file holds: read(n) allocates n bytes first, and a
                # follower polling for a few new records would allocate 4 MiB each time, which
                # fragments the heap (resident memory grew ~50 bytes per record followed).
                unread = os.fstat(handle.fileno()).st_size - handle.tell()
                chunk = handle.read(min(_CHUNK, max(unread, _SMALL_CHUNK)))
                if not chunk:
                    if not pending:
                        return
                    if good_frame_in(pending, 1, len(pending)):
                        raise self._damaged("a frame runs past the end of the file, and good "
                                            "frames follow it")
                    problem = damage_at(pending, 0, len(pending))
                    if problem is not None:
                        raise self._damaged(f"offset {self._offset}: {problem}")
                    return  # a frame still being written, as far as can be told
                buf = pending + chunk if pending else chunk
                base = self._offset
                size = len(buf)
                view = memoryview(buf)
                offset = 0
                next_position = self.next_position
                # Skip records before the cursor cheaply (header only, no checksum).
                unpack = HEADER.unpack_from
                while size - offset >= HEADER_SIZE:
                    head = unpack(view, offset)
                    end = offset + HEADER_SIZE + head[2] + head[5]
                    if head[6] >= next_position or head[0] != MAGIC or end > size:
                        break
                    offset = end
                    self._offset = base + offset
                while offset < size:
                    frame = frame_at(view, offset, size)
                    if isinstance(frame, str):
                        problem = None if frame == "torn" else damage_at(view, offset, size)
                        if problem is not None:
                            raise self._damaged(f"offset {base + offset}: {problem}")
                        # Incomplete so far: judged once the end of the file is reached.
                        break
                    end, type_len, version, position, _, _ = frame
                    if position < next_position:
                        offset = end
                        self._offset = base + offset
                        continue
                    if limit is not None and position > limit:
                        return
                    if position != next_position:
                        raise LogCorruptedError(
                            f"The log is damaged at position {next_position} "
                            f"({segment.name}: position {position} at offset {base + offset}, "
                            f"after {next_position - 1}); run 'xml-pipeline replay --verify' "
                            "for details.",
                            position=next_position,
                        )
                    start = offset + HEADER_SIZE
                    try:
                        event = decode(bytes(view[start: start + type_len]), version,
                                       bytes(view[start + type_len: end]))
                    except RecordDecodeError as exc:
                        raise RecordDecodeError(
                            f"The record at position {position} ({segment.name}, offset "
                            f"{base + offset}) cannot be read: {exc.message}") from exc
                    next_position = position + 1
                    offset = end
                    self.next_position = next_position
                    self._offset = base + offset
                    yield Recorded(position, event)
                pending = bytes(view[offset:]) if offset < size else b""

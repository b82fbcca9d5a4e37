"""The on-disk format of the file log: segment files of checksummed, hash-chained frames.

A log directory holds segment files named by the position of their first record
(``00000000000000000001.log``). Each record is one frame::

    offset size
    0      2    magic b"XP"
    2      1    frame format (1)
    3      1    length of the type name
    4      4    CRC-32 of every byte from offset 8 to the end of the frame
    8      2    event version
    10     4    length of the data
    14     8    position
    22     8    timestamp (float seconds)
    30     16   chain hash: BLAKE2b-128(previous chain hash + bytes 8..30 + type + data)
    46     ...  type name (ASCII), then data (JSON)

The CRC finds torn and damaged frames cheaply on every read; the hash chain (checked by
``verify_log``) finds any edit, insertion or removal, since every hash depends on all records
before it. The first record's previous hash is sixteen zero bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xml_pipeline.errors import LogCorruptedError, RecordDecodeError
from xml_pipeline.events import Recorded, decode

__all__ = [
    "GENESIS",
    "HEADER",
    "LogReader",
    "ScanResult",
    "VerifyResult",
    "chain_hash",
    "hash_at",
    "locate_record",
    "make_frame",
    "scan_segment",
    "segment_name",
    "segments",
    "verify_log",
]

MAGIC = b"XP"
FORMAT = 1
HEADER = struct.Struct("<2sBBIHIQd16s")
_CONTENT = struct.Struct("<HIQd")  # the hashed part of the header (offsets 8..30)
HEADER_SIZE = HEADER.size
GENESIS = bytes(16)
SUFFIX = ".log"
_CHUNK = 4 * 1024 * 1024
_SMALL_CHUNK = 64 * 1024
_MAX_DATA = 1 << 30


def segment_name(first_position: int) -> str:
    return f"{first_position:020d}{SUFFIX}"


def segments(directory: Path) -> list[tuple[int, Path]]:
    """The segment files of a log directory as ``(first position, path)``, in order."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.name
        if name.endswith(SUFFIX) and name[: -len(SUFFIX)].isdigit():
            found.append((int(name[: -len(SUFFIX)]), Path(entry.path)))
    found.sort()
    return found


def chain_hash(previous: bytes, content: bytes | memoryview, type_name: bytes,
               data: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(content)
    h.update(type_name)
    h.update(data)
    return h.digest()


def make_frame(*, position: int, at: float, type_name: bytes, version: int, data: bytes,
               previous: bytes) -> tuple[bytes, bytes]:
    """One encoded frame and its chain hash."""
    content = _CONTENT.pack(version, len(data), position, at)
    digest = chain_hash(previous, content, type_name, data)
    body = b"".join((content, digest, type_name, data))
    crc = zlib.crc32(body)
    head = struct.pack("<2sBBI", MAGIC, FORMAT, len(type_name), crc)
    return head + body, digest


@dataclass(slots=True)
class ScanResult:
    """Where a scan of one segment stopped, and why."""

    end: int  # offset just past the last good frame
    last_position: int  # 0 if no good frame
    last_hash: bytes
    count: int
    problem: str | None  # None: clean end; "torn": incomplete tail; otherwise a description


def _frame_at(buf: bytes | memoryview, offset: int, size: int
              ) -> tuple[int, int, int, int, float, bytes] | str:
    """``(end, type_len, version, position, at, hash)`` or the reason the frame is bad."""
    if size - offset < HEADER_SIZE:
        return "torn"
    magic, fmt, type_len, crc, version, data_len, position, at, digest = HEADER.unpack_from(
        buf, offset)
    if magic != MAGIC or fmt != FORMAT or data_len > _MAX_DATA:
        return f"bad frame header at offset {offset}"
    end = offset + HEADER_SIZE + type_len + data_len
    if end > size:
        return "torn"
    if zlib.crc32(buf[offset + 8: end]) != crc:
        return f"checksum mismatch at offset {offset}"
    return end, type_len, version, position, at, digest


def last_position_in(path: Path) -> int:
    """The position of the last complete frame of a segment with a valid checksum, or 0: a
    cheap look for read-only openers (it walks the headers, then checks frames from the end
    until one is good); readers still check every frame they read."""
    with open(path, "rb") as handle:
        buf = handle.read()
    size = len(buf)
    offset = 0
    starts = []
    unpack = HEADER.unpack_from
    while size - offset >= HEADER_SIZE:
        head = unpack(buf, offset)
        end = offset + HEADER_SIZE + head[2] + head[5]
        if head[0] != MAGIC or end > size:
            break
        starts.append(offset)
        offset = end
    for offset in reversed(starts):  # a damaged header must not name the last position
        frame = _frame_at(buf, offset, size)
        if not isinstance(frame, str):
            return frame[3]
    return 0


def scan_segment(path: Path, *, expect_first: int | None = None) -> ScanResult:
    """Check every frame of a segment (CRC and consecutive positions) up to the first problem."""
    buf = path.read_bytes()
    size = len(buf)
    offset = 0
    last_position = 0
    last_hash = GENESIS
    count = 0
    expected = expect_first
    while offset < size:
        frame = _frame_at(buf, offset, size)
        if isinstance(frame, str):
            return ScanResult(offset, last_position, last_hash, count, frame)
        end, _, _, position, _, digest = frame
        if expected is not None and position != expected:
            return ScanResult(offset, last_position, last_hash, count,
                              f"position {position} where {expected} was expected "
                              f"at offset {offset}")
        expected = position + 1
        last_position, last_hash, count, offset = position, digest, count + 1, end
    return ScanResult(offset, last_position, last_hash, count, None)


def _good_frame_in(buf: bytes | memoryview, start: int, size: int) -> bool:
    """True if a well-formed frame starts anywhere in ``buf[start:size]``."""
    data = buf if isinstance(buf, bytes) else bytes(buf[:size])
    while True:
        found = data.find(MAGIC, start, size)
        if found < 0:
            return False
        if not isinstance(_frame_at(data, found, size), str):
            return True
        start = found + 1


def has_good_frame_after(path: Path, offset: int) -> bool:
    """True if a well-formed frame starts anywhere after ``offset`` (so the damage is not a torn
    tail but corruption in the middle)."""
    buf = path.read_bytes()
    return _good_frame_in(buf, offset + 1, len(buf))


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
                    if pending and _good_frame_in(pending, 1, len(pending)):
                        raise self._damaged("a frame runs past the end of the file, and good "
                                            "frames follow it")
                    return
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
                    frame = _frame_at(view, offset, size)
                    if isinstance(frame, str):
                        if frame != "torn" and has_good_frame_after(segment, base + offset):
                            raise self._damaged(frame)
                        # An incomplete (or torn) tail: not written yet, as far as we can tell.
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


@dataclass(frozen=True, slots=True)
class VerifyResult:
    records: int
    last_position: int
    bad_position: int | None  # the first record that fails, if any
    problem: str | None
    torn_bytes: int  # incomplete bytes at the very end (a torn tail or a write in progress)

    @property
    def ok(self) -> bool:
        return self.bad_position is None


def verify_log(directory: Path) -> VerifyResult:
    """Check every frame's CRC, consecutive positions and the whole hash chain."""
    previous = GENESIS
    expected = 1
    records = 0
    listing = segments(directory)
    for index, (first, path) in enumerate(listing):
        if first != expected:
            return VerifyResult(records, expected - 1, expected,
                                f"segment {path.name} starts at {first}, expected {expected}", 0)
        buf = path.read_bytes()
        size = len(buf)
        view = memoryview(buf)
        offset = 0
        while offset < size:
            frame = _frame_at(view, offset, size)
            if isinstance(frame, str):
                last_segment = index == len(listing) - 1
                if (frame == "torn" and last_segment
                        and not _good_frame_in(buf, offset + 1, size)):
                    return VerifyResult(records, expected - 1, None, None, size - offset)
                reason = "incomplete frame" if frame == "torn" else frame
                return VerifyResult(records, expected - 1, expected,
                                    f"{path.name}: {reason}", 0)
            end, type_len, _, position, _, digest = frame
            if position != expected:
                return VerifyResult(records, expected - 1, expected,
                                    f"{path.name}: position {position} where {expected} "
                                    f"was expected (offset {offset})", 0)
            start = offset + HEADER_SIZE
            computed = chain_hash(previous, view[offset + 8: offset + 30],
                                  bytes(view[start: start + type_len]),
                                  view[start + type_len: end])
            if computed != digest:
                return VerifyResult(records, expected - 1, expected,
                                    f"{path.name}: hash chain broken at offset {offset} "
                                    "(this record or the one before it was altered)", 0)
            previous = digest
            records += 1
            expected += 1
            offset = end
    return VerifyResult(records, expected - 1, None, None, 0)



def locate_record(directory: Path, position: int) -> tuple[str, int, bytes] | None:
    """``(segment name, offset, chain hash)`` of the record at ``position``, or None."""
    chosen = None
    for first, path in segments(directory):
        if first <= position:
            chosen = path
        else:
            break
    if chosen is None or position < 1:
        return None
    buf = chosen.read_bytes()
    size = len(buf)
    offset = 0
    while offset < size:
        head = _frame_at(buf, offset, size)
        if isinstance(head, str):
            return None
        end, _, _, found, _, digest = head
        if found == position:
            return chosen.name, offset, digest
        offset = end
    return None


def hash_at(directory: Path, segment: str, offset: int, position: int) -> bytes | None:
    """The chain hash of the record at ``position`` if it sits at ``segment``:``offset``."""
    try:
        with open(directory / segment, "rb") as handle:
            handle.seek(offset)
            head = handle.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                return None
            type_len, data_len = head[3], HEADER.unpack_from(head)[5]
            rest = handle.read(type_len + data_len)
    except OSError:
        return None
    buf = head + rest
    frame = _frame_at(buf, 0, len(buf))
    if isinstance(frame, str) or frame[3] != position:
        return None
    return frame[5]

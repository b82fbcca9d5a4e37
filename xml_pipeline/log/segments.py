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
from xml_pipeline.log.anchors import anchors

__all__ = [
    "GENESIS",
    "HEADER",
    "LogReader",
    "VerifyResult",
    "chain_hash",
    "damage_at",
    "frame_at",
    "good_frame_in",
    "hash_at",
    "locate_record",
    "make_frame",
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


def frame_at(buf: bytes | memoryview, offset: int, size: int
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


def good_frame_in(buf: bytes | memoryview, start: int, size: int) -> bool:
    """True if a well-formed frame starts anywhere in ``buf[start:size]``."""
    data = buf if isinstance(buf, bytes) else bytes(buf[:size])
    while True:
        found = data.find(MAGIC, start, size)
        if found < 0:
            return False
        if not isinstance(frame_at(data, found, size), str):
            return True
        start = found + 1


def damage_at(buf: bytes | memoryview, offset: int, size: int) -> str | None:
    """Tell a torn tail from damage, where no good frame starts at ``offset``.

    None if ``buf[offset:size]`` may be a frame that was never completely written (a torn
    tail): fewer bytes than a header, a header whose length runs past ``size``, or a frame
    whose end is zero bytes up to ``size`` (space the file system gave the file that no write
    reached; a frame's type and data, JSON, never end with one). A write that stops early
    leaves a prefix of good bytes, so a frame that is all there, ends with what was written
    and still fails its check was damaged after it was written: the answer then says what
    fails. A frame whose
    length field was damaged is all there too, and is told apart by its checksum, which
    matches the bytes up to ``size`` once the length says so. The caller checks that no good
    frame follows (``good_frame_in``): a torn frame is always the last thing in the file.
    """
    rest = size - offset
    if rest < HEADER_SIZE:
        return None
    tail = bytes(buf[offset:size])
    if tail.count(0) == rest:
        return None
    type_len, crc, data_len = tail[3], *struct.unpack_from("<I2xI", tail, 4)
    length = HEADER_SIZE + type_len + data_len
    if length <= rest:
        problem = frame_at(tail, 0, rest)
        if not isinstance(problem, str):
            return None  # a good frame: not for this function to judge
        if len(tail.rstrip(b"\0")) < length:
            return None  # its last bytes were never written
        kind = "bad frame header" if problem.startswith("bad") else "checksum mismatch"
        return f"{kind}, in a whole frame (so it was damaged after it was written)"
    # It runs past the end. Its type length is outside the checksum; its data length is in it.
    implied = rest - HEADER_SIZE - type_len
    if zlib.crc32(tail[8:]) == crc or (implied >= 0 and zlib.crc32(
            tail[8:10] + struct.pack("<I", implied) + tail[14:]) == crc):
        return ("a damaged length field, in a whole frame (its checksum matches the bytes up "
                "to the end of the file)")
    return None


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


@dataclass(frozen=True, slots=True)
class VerifyResult:
    records: int
    last_position: int
    bad_position: int | None  # the first record that fails, if any
    problem: str | None
    torn_bytes: int  # incomplete bytes at the very end (a torn tail or a write in progress)
    segment: str | None = None  # the file where the first bad record is, or should be
    offset: int = 0  # and where in it
    #: (snapshot file, what is wrong) for each snapshot whose anchor the log contradicts
    snapshots: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """True if every record checks out (the snapshots are judged apart)."""
        return self.bad_position is None


def verify_log(directory: Path) -> VerifyResult:
    """Check every frame's CRC, consecutive positions from 1, the whole hash chain, and every
    snapshot's anchor against the chain: the deep check that reads the whole log."""
    witnesses = {anchor.position: (path.name, anchor) for path, anchor in anchors(directory)}
    contradicted: list[tuple[str, str]] = []
    previous = GENESIS
    expected = 1
    records = 0
    listing = segments(directory)

    def result(problem: str | None = None, segment: str | None = None, offset: int = 0,
               torn: int = 0) -> VerifyResult:
        last = expected - 1
        for position, (name, _) in sorted(witnesses.items()):
            if position > last:
                contradicted.append((name, f"it includes position {position}, but the log "
                                           f"holds intact records only up to {last}"))
        return VerifyResult(records, last, None if problem is None else expected, problem,
                            torn, segment, offset, tuple(contradicted))

    for index, (first, path) in enumerate(listing):
        if first != expected:
            return result(f"segment {path.name} starts at {first}, expected {expected}",
                          path.name)
        buf = path.read_bytes()
        size = len(buf)
        view = memoryview(buf)
        offset = 0
        while offset < size:
            frame = frame_at(view, offset, size)
            if isinstance(frame, str):
                followed = good_frame_in(buf, offset + 1, size)
                damage = damage_at(view, offset, size)
                if index == len(listing) - 1 and not followed and damage is None:
                    return result(torn=size - offset)
                if damage is not None:
                    return result(f"{path.name}, offset {offset}: {damage}", path.name, offset)
                reason = f"incomplete frame at offset {offset}" if frame == "torn" else frame
                return result(f"{path.name}: {reason}", path.name, offset)
            end, type_len, _, position, _, digest = frame
            if position != expected:
                return result(f"{path.name}: position {position} where {expected} was "
                              f"expected (offset {offset})", path.name, offset)
            start = offset + HEADER_SIZE
            computed = chain_hash(previous, view[offset + 8: offset + 30],
                                  bytes(view[start: start + type_len]),
                                  view[start + type_len: end])
            if computed != digest:
                return result(f"{path.name}: hash chain broken at offset {offset} (this "
                              "record or the one before it was altered)", path.name, offset)
            witness = witnesses.pop(position, None)
            if witness is not None and witness[1].chain_hash != digest.hex():
                contradicted.append((witness[0], (
                    f"it records the chain hash {witness[1].chain_hash[:16]}... for position "
                    f"{position}, but the log's chain gives {digest.hex()[:16]}...")))
            previous = digest
            records += 1
            expected += 1
            offset = end
    return result()


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
        head = frame_at(buf, offset, size)
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
    frame = frame_at(buf, 0, len(buf))
    if isinstance(frame, str) or frame[3] != position:
        return None
    return frame[5]

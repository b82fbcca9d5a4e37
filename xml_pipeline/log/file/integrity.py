"""The integrity checks of a file log: the cheap one on every open, and the deep one.

``check_log`` refuses (``LogDamagedError``, naming the segment file, the offset and the
position) a log whose history is not whole, and finds where it ends. It is cheap: it reads
a few frames of each sealed segment and the last segment in full, never the whole log.

- The segments follow one another from position 1: each file starts with the record its
  name says (the first with 1), the first record of each continues the hash chain of the
  last record of the one before, and each sealed segment ends with a whole record just
  before the next one's first (a deleted, cut, swapped or extended segment fails here).
- Every frame of the last segment passes its checksum, at consecutive positions, up to the
  end or a torn tail: a frame that was never completely written, which a writer cuts off. A
  whole frame that fails its checksum is damage, wherever it is (``segments.damage_at``).
- Every snapshot's anchor matches: the log holds the record the snapshot includes, with
  the chain hash it recorded (``anchors``), so history cannot be lost or changed under it.

Damage inside a record in the middle of a sealed segment passes this check; ``verify_log``
(``xml-pipeline replay --verify``) finds it, and so does any read that reaches it: it reads
every frame, checks every checksum and the whole hash chain, and every snapshot's anchor
against the chain it recomputes.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from xml_pipeline.errors import LogDamagedError
from xml_pipeline.log.file.anchors import SNAPSHOTS, anchors
from xml_pipeline.log.file.segments import (
    GENESIS,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    chain_hash,
    damage_at,
    frame_at,
    good_frame_in,
    hash_at,
    locate_record,
    segments,
)

__all__ = ["LogEnd", "VerifyResult", "check_log", "damaged", "verify_log"]

_WINDOW = 64 * 1024  # how far from its end a sealed segment is first searched for its last frame
_START = MAGIC + bytes([1])  # every frame starts with these bytes


@dataclass(frozen=True, slots=True)
class LogEnd:
    """Where a log that passed ``check_log`` ends."""

    segment: Path | None  # the segment holding the last record (None: there is none)
    size: int  # where that record ends in it: where the next one goes
    position: int  # the last record's position (0: none)
    chain_hash: bytes
    #: a torn tail, as (segment, offset it starts at): a writer cuts it off (the segment
    #: goes, if it holds no whole record)
    torn: tuple[Path, int] | None = None
    torn_bytes: int = 0


def damaged(directory: Path, position: int, segment: str | None, offset: int | None,
            problem: str) -> LogDamagedError:
    """The one refusal of a damaged log: where, what, and what to do."""
    place = "" if segment is None else (
        f"{segment}, offset {offset}: " if offset is not None else f"{segment}: ")
    return LogDamagedError(
        f"The log at {directory} is damaged at position {position} ({place}{problem}); it was "
        f"not changed. Run 'xml-pipeline replay --verify --data {directory}' for the full "
        f"check, then 'xml-pipeline repair --data {directory}' to move the damaged part aside "
        "(it is kept, not deleted), or restore the log from a copy.",
        position=position, segment=segment, offset=offset)


def check_log(directory: Path) -> LogEnd:
    """Check the log in ``directory`` as the module docstring says; raise
    ``LogDamagedError`` if it fails, else say where it ends. Changes nothing."""
    # Anchors first: each snapshot was written after its record was, so a log that only
    # grows holds that record by the time the segments are read below.
    witnesses = anchors(directory)
    listing = segments(directory)
    end = LogEnd(None, 0, 0, GENESIS)
    if listing and listing[0][0] != 1:
        first, path = listing[0]
        raise damaged(directory, 1, path.name, 0, f"the first segment starts at position "
                      f"{first}, so records 1 to {first - 1} are missing")
    for index, (_, path) in enumerate(listing):
        # Each sealed segment was checked to end just before the next one's first position.
        if index < len(listing) - 1:
            end = _sealed(directory, path, end, listing[index + 1])
        else:
            end = _last(directory, path, end)
    for path, anchor in witnesses:
        _witness(directory, end, f"{SNAPSHOTS}/{path.name}", anchor.position, anchor.segment,
                 anchor.offset, anchor.chain_hash)
    return end


def _first_record(directory: Path, path: Path, buf: bytes, before: LogEnd) -> int:
    """Check the first frame of a segment, whose bytes start ``buf``: where it ends."""
    expected = before.position + 1
    frame = frame_at(buf, 0, len(buf))
    if isinstance(frame, str):
        reason = ("its first record runs past the end of the file" if frame == "torn"
                  else f"its first record fails its check ({frame.split(' at offset')[0]})")
        raise damaged(directory, expected, path.name, 0, reason)
    end, type_len, _, position, _, digest = frame
    if position != expected:
        raise damaged(directory, expected, path.name, 0,
                      f"its first record holds position {position}, where its name says "
                      f"{expected}")
    start = HEADER_SIZE + type_len
    if chain_hash(before.chain_hash, buf[8:30], buf[HEADER_SIZE:start], buf[start:end]) \
            != digest:
        after = ("the start of the log" if before.segment is None
                 else f"the last record of {before.segment.name}")
        raise damaged(directory, expected, path.name, 0,
                      f"the hash chain is broken: its first record does not follow {after}")
    return end


def _sealed(directory: Path, path: Path, before: LogEnd, following: tuple[int, Path]
            ) -> LogEnd:
    """Check a segment that a later one follows: its first and last records only."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise damaged(directory, before.position + 1, path.name, 0,
                          f"it is empty, but {following[1].name} follows it")
        head = handle.read(HEADER_SIZE)
        length = HEADER_SIZE + head[3] + HEADER.unpack_from(head)[5] \
            if len(head) == HEADER_SIZE else len(head) + 1
        head += handle.read(min(length, size) - len(head))
        _first_record(directory, path, head, before)
        found = _last_frame(handle, size)
    next_first = following[0]
    if found is None:  # cannot be: its first frame is good
        raise damaged(directory, before.position + 1, path.name, 0, "it holds no whole record")
    _, end, position, digest = found
    if end != size:
        raise damaged(directory, position + 1, path.name, end,
                      f"the {size - end} bytes after its last whole record (position "
                      f"{position}) are not a record")
    if position != next_first - 1:
        if position < next_first - 1:
            raise damaged(directory, position + 1, path.name, end,
                          f"it ends at position {position}, but the next segment "
                          f"{following[1].name} starts at {next_first}, so records "
                          f"{position + 1} to {next_first - 1} are missing")
        raise damaged(directory, next_first, following[1].name, 0,
                      f"it starts at position {next_first}, but {path.name} holds records "
                      f"up to {position}")
    return LogEnd(path, size, position, digest)


def _last_frame(handle: BinaryIO, size: int) -> tuple[int, int, int, bytes] | None:
    """``(offset, end, position, chain hash)`` of the good frame that starts last in the
    segment file ``handle``, read backwards from its end a window at a time (so only its last
    records are read), or None if it holds none."""
    window = _WINDOW
    while True:
        base = max(0, size - window)
        handle.seek(base)
        buf = handle.read(size - base)
        limit = len(buf)
        while (found := buf.rfind(_START, 0, limit)) >= 0:
            frame = frame_at(buf, found, len(buf))
            if not isinstance(frame, str):
                return base + found, base + frame[0], frame[3], frame[5]
            limit = found
        if base == 0:
            return None
        window *= 8


def _last(directory: Path, path: Path, before: LogEnd) -> LogEnd:
    """Check every frame of the last segment, and find its end and any torn tail."""
    buf = path.read_bytes()
    size = len(buf)
    if size == 0:
        return LogEnd(before.segment, before.size, before.position, before.chain_hash,
                      torn=(path, 0))
    offset = 0
    first = frame_at(buf, 0, size)
    if isinstance(first, str):
        if good_frame_in(buf, 1, size) or damage_at(buf, 0, size) is not None:
            raise damaged(directory, before.position + 1, path.name, 0,
                          damage_at(buf, 0, size) or "its first record is damaged, and good "
                          "records follow it")
        return LogEnd(before.segment, before.size, before.position, before.chain_hash,
                      torn=(path, 0), torn_bytes=size)
    offset = _first_record(directory, path, buf, before)
    position, digest = first[3], first[5]
    crc32, unpack, view = zlib.crc32, HEADER.unpack_from, memoryview(buf)
    while size - offset >= HEADER_SIZE:
        magic, fmt, type_len, crc, _, data_len, found, _, next_digest = unpack(buf, offset)
        end = offset + HEADER_SIZE + type_len + data_len
        if magic != MAGIC or fmt != 1 or end > size or crc32(view[offset + 8:end]) != crc:
            break
        if found != position + 1:
            raise damaged(directory, position + 1, path.name, offset,
                          f"it holds position {found} where {position + 1} belongs")
        position, digest, offset = found, next_digest, end
    if offset < size:
        if good_frame_in(buf, offset + 1, size):
            raise damaged(directory, position + 1, path.name, offset,
                          damage_at(buf, offset, size) or "a record that runs past the end of "
                          "the file where good records follow it")
        problem = damage_at(buf, offset, size)
        if problem is not None:
            raise damaged(directory, position + 1, path.name, offset, problem)
        return LogEnd(path, offset, position, digest, torn=(path, offset),
                      torn_bytes=size - offset)
    return LogEnd(path, size, position, digest)


def _witness(directory: Path, end: LogEnd, snapshot: str, position: int, segment: str,
             offset: int, recorded: str) -> None:
    """Refuse the log unless it holds the record at ``position`` with the chain hash that
    ``snapshot`` recorded for it."""
    if position > end.position:
        where = None if end.segment is None else end.segment.name
        raise damaged(directory, end.position + 1, where, end.size if where else None,
                      f"the log ends at position {end.position}, but the snapshot {snapshot} "
                      f"includes records up to {position}, so they are missing")
    digest = hash_at(directory, segment, offset, position)
    if digest is None:  # not where the snapshot saw it: look for it
        location = locate_record(directory, position)
        if location is not None:
            segment, offset, digest = location
    if digest is None or digest.hex() != recorded:
        held = "no such record" if digest is None else f"the chain hash {digest.hex()[:16]}..."
        raise damaged(directory, position, segment, offset,
                      f"the snapshot {snapshot} recorded the chain hash {recorded[:16]}... for "
                      f"this record, but the log holds {held}: the history up to it is not "
                      "the one the snapshot saw")


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

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
from pathlib import Path

__all__ = [
    "GENESIS",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "chain_hash",
    "damage_at",
    "frame_at",
    "good_frame_in",
    "hash_at",
    "locate_record",
    "make_frame",
    "segment_name",
    "segments",
]

MAGIC = b"XP"
FORMAT = 1
HEADER = struct.Struct("<2sBBIHIQd16s")
_CONTENT = struct.Struct("<HIQd")  # the hashed part of the header (offsets 8..30)
HEADER_SIZE = HEADER.size
GENESIS = bytes(16)
SUFFIX = ".log"
_SCAN = 1024 * 1024  # how much of a segment ``locate_record`` reads at a time
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


def locate_record(directory: Path, position: int, *, start: tuple[str, int] | None = None
                  ) -> tuple[str, int, bytes] | None:
    """``(segment name, offset, chain hash)`` of the record at ``position``, or None.

    Reads the segment that holds it from its start, or from ``start`` (segment name, offset of
    a frame at or before ``position``) when that is in the same segment, and only as far as
    the record: a recent record is found without reading the whole segment."""
    chosen = None
    for first, path in segments(directory):
        if first <= position:
            chosen = path
        else:
            break
    if chosen is None or position < 1:
        return None
    base = start[1] if start is not None and start[0] == chosen.name else 0
    try:
        handle = open(chosen, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with handle:
        handle.seek(base)
        pending = b""
        while chunk := handle.read(_SCAN):
            buf = pending + chunk if pending else chunk
            offset = 0
            while not isinstance(frame := frame_at(buf, offset, len(buf)), str):
                end, _, _, found, _, digest = frame
                if found >= position:
                    return (chosen.name, base + offset, digest) if found == position else None
                offset = end
            if frame != "torn":
                return None  # damage: no record can be found past it
            pending, base = buf[offset:], base + offset
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

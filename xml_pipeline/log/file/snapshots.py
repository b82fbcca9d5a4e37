"""Snapshots of a file log: files in its ``snapshots/`` folder, next to the segments.

Each file is its anchor (``anchors``: the position it includes, where that record's frame is
and its chain hash), then the encoded state, which this module never reads: it is the state
layer's. A snapshot is used only while the log still holds that very record, and every open
of the log checks every anchor (``integrity``), so a snapshot also witnesses the history up to
it. Files are written in a worker thread, one at a time, fsynced, then renamed into place;
the newest ``keep`` are kept.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import msgspec

from xml_pipeline.errors import LogError
from xml_pipeline.log.file.anchors import ANCHOR_VERSION, SNAPSHOTS, SUFFIX, Anchor
from xml_pipeline.log.file.places import Places
from xml_pipeline.log.file.segments import hash_at, locate_record

__all__ = ["FileSnapshots"]


class _Snapshot(Anchor):
    """A snapshot file: its anchor, then the encoded state (kept as it is, undecoded)."""

    state: msgspec.Raw


class FileSnapshots:
    """The ``Snapshots`` of the file log in ``directory``; ``places`` is the log's own."""

    def __init__(self, directory: Path, places: Places, *, keep: int = 2) -> None:
        self._folder = directory / SNAPSHOTS
        self._directory = directory
        self._places = places
        self._keep = keep
        # Keeps two writes apart, even when a cancelled wait left one running in its thread.
        self._lock = threading.Lock()

    async def latest(self, *, upto: int | None = None) -> tuple[int, bytes] | None:
        """The newest snapshot whose record the log holds with the chain hash it recorded (and
        not past ``upto``), as ``(position, encoded state)``; None if there is none. The log
        then knows where that record is, so that reading after it starts there."""
        found = await asyncio.to_thread(self._latest, upto)
        if found is None:
            return None
        snapshot, state = found
        self._places.remember(snapshot.position, snapshot.segment, snapshot.offset,
                              bytes.fromhex(snapshot.chain_hash))
        return snapshot.position, state

    def _latest(self, upto: int | None) -> tuple[_Snapshot, bytes] | None:
        try:
            names = sorted((n for n in os.listdir(self._folder) if n.endswith(SUFFIX)),
                           reverse=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        for name in names:
            try:
                snapshot = msgspec.json.decode((self._folder / name).read_bytes(),
                                               type=_Snapshot)
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue
            if snapshot.version != ANCHOR_VERSION or (upto is not None
                                                       and snapshot.position > upto):
                continue
            digest = hash_at(self._directory, snapshot.segment, snapshot.offset,
                             snapshot.position)
            if digest is not None and digest.hex() == snapshot.chain_hash:
                return snapshot, bytes(snapshot.state)
        return None

    async def save(self, position: int, state: bytes) -> bool:
        """Save ``state`` (encoded, of the records up to ``position``) as a snapshot; False,
        saving nothing, if the log lacks the record at ``position``. Raises ``LogError`` if
        the file cannot be written."""
        # The place of the record, or of the nearest one before it: found here, on the loop,
        # which owns the places; the thread then reads little or nothing of the segment.
        location = self._places.get(position)
        start = self._places.before(position) if location is None else None
        try:
            return await asyncio.to_thread(self._save, position, state, location, start)
        except OSError as exc:
            raise LogError(f"The snapshot of position {position} could not be written in "
                           f"{self._folder} ({exc.strerror or exc}).") from exc

    def _save(self, position: int, state: bytes, location: tuple[str, int, bytes] | None,
              start: tuple[str, int] | None) -> bool:
        with self._lock:
            if location is None:
                location = locate_record(self._directory, position, start=start)
            if location is None:
                return False
            self._write(position, state, location)
            return True

    def _write(self, position: int, state: bytes, location: tuple[str, int, bytes]) -> None:
        segment, offset, digest = location
        self._folder.mkdir(exist_ok=True)
        path = self._folder / f"{position:020d}{SUFFIX}"
        data = msgspec.json.encode(_Snapshot(version=ANCHOR_VERSION, position=position,
                                             segment=segment, offset=offset,
                                             chain_hash=digest.hex(), state=msgspec.Raw(state)))
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        for old in sorted(self._folder.glob(f"*{SUFFIX}"))[:-self._keep]:
            old.unlink(missing_ok=True)

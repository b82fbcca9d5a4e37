"""Repair: move the damaged part of a file log aside, never deleting it, and record it.

``repair_log`` is what ``xml-pipeline repair`` runs on a log that opening refuses
(``LogDamagedError``). Holding the log's lock, it runs the deep check (``verify_log``) and
moves aside, into a new folder ``damaged-N`` of the log directory:

- bytes after the last whole record of a sealed segment that hold no record (garbage
  appended to it): only those go, and the records after them stay;
- otherwise everything from the first bad record on: the rest of its segment (as
  ``<segment>.from-<offset>``) and every later segment, whole;
- the snapshots whose anchor the log then contradicts (a snapshot of records now gone).

It checks again after each step until the log passes, then appends ``LogRepaired`` saying
what it found and moved, so the log itself tells the story. The moved files are kept for
inspection; the ``LogRepaired`` record takes the first position they held, so they cannot
simply be moved back (restore the whole directory from a copy to keep those records).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from xml_pipeline.errors import LogCorruptedError
from xml_pipeline.events import LogRepaired
from xml_pipeline.log.file.anchors import SNAPSHOTS
from xml_pipeline.log.file.file import FileLog
from xml_pipeline.log.file.integrity import verify_log
from xml_pipeline.log.file.segments import good_frame_in, segments
from xml_pipeline.log.file.writer import fsync_directory

__all__ = ["Repair", "repair_log"]


@dataclass(frozen=True, slots=True)
class Repair:
    """What ``repair_log`` did: nothing (``event`` is None) or ``event`` at ``position``."""

    event: LogRepaired | None
    position: int  # the LogRepaired's position, or the last position if nothing was done
    torn_bytes: int  # a torn tail left for the next open to cut (when nothing was done)


class _Mover:
    """Moves parts of the log into one ``damaged-N`` folder, created on first use."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.folder: Path | None = None
        self.moved: list[str] = []

    def _target(self, name: str) -> Path:
        if self.folder is None:
            n = 1
            while (self.directory / f"damaged-{n}").exists():
                n += 1
            self.folder = self.directory / f"damaged-{n}"
            self.folder.mkdir()
            fsync_directory(self.directory)
        target = self.folder / name
        target.parent.mkdir(exist_ok=True)
        return target

    def tail(self, path: Path, offset: int) -> None:
        """Move the bytes of ``path`` from ``offset`` on (the whole file if 0)."""
        size = path.stat().st_size
        if offset == 0:
            target = self._target(path.name)
            os.rename(path, target)
            self.moved.append(f"{path.name} ({size} bytes) to {self._relative(target)}")
            return
        target = self._target(f"{path.name}.from-{offset}")
        with open(path, "r+b") as source, open(target, "wb") as copy:
            source.seek(offset)
            shutil.copyfileobj(source, copy)
            copy.flush()
            os.fsync(copy.fileno())
            source.truncate(offset)
            source.flush()
            os.fsync(source.fileno())
        self.moved.append(f"{path.name} from offset {offset} ({size - offset} bytes) to "
                          f"{self._relative(target)}")

    def snapshot(self, name: str) -> None:
        target = self._target(f"{SNAPSHOTS}/{name}")
        os.rename(self.directory / SNAPSHOTS / name, target)
        self.moved.append(f"{SNAPSHOTS}/{name} to {self._relative(target)}")

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.directory))

    def sync(self) -> None:
        if self.folder is None:
            return
        for folder in (self.folder, self.folder / SNAPSHOTS, self.directory,
                       self.directory / SNAPSHOTS):
            if folder.is_dir():
                fsync_directory(folder)


def _move_damage(directory: Path, mover: _Mover) -> tuple[list[str], int | None, int, int]:
    """Move aside until ``verify_log`` passes: ``(problems, first position cut, last position,
    torn bytes)``."""
    problems: list[str] = []
    cut_at: int | None = None
    while True:
        result = verify_log(directory)
        if result.ok:
            break
        assert result.segment is not None and result.bad_position is not None
        problems.append(f"position {result.bad_position}: {result.problem}")
        listing = [path for _, path in segments(directory)]
        path = directory / result.segment
        index = listing.index(path)
        buf = path.read_bytes()
        sealed = index < len(listing) - 1
        if sealed and result.offset > 0 and not good_frame_in(buf, result.offset, len(buf)):
            mover.tail(path, result.offset)  # no record in them: the records after stay
            continue
        cut_at = result.bad_position if cut_at is None else min(cut_at, result.bad_position)
        mover.tail(path, result.offset)
        for later in listing[index + 1:]:
            mover.tail(later, 0)
    for name, problem in result.snapshots:
        problems.append(f"{SNAPSHOTS}/{name}: {problem}")
        mover.snapshot(name)
    return problems, cut_at, result.last_position, result.torn_bytes


async def repair_log(directory: str | Path, *, at: float, fsync: str = "batch") -> Repair:
    """Repair the log in ``directory`` as the module docstring says, if it needs it.

    Raises ``LogLockedError`` if a process writes to it (stop it first) and
    ``LogCorruptedError`` if there is no log there. ``at`` is the time of the event.
    """
    log = FileLog(Path(directory), readonly=False, fsync=fsync, segment_bytes=64 << 20)
    if not log.directory.is_dir():
        raise LogCorruptedError(f"There is no log at {log.directory}.", position=0)
    log._lock()
    mover = _Mover(log.directory)
    try:
        problems, cut_at, last, torn = await asyncio.to_thread(_move_damage, log.directory, mover)
        await asyncio.to_thread(mover.sync)
    except BaseException:
        log._unlock()
        raise
    if mover.folder is None:  # nothing was wrong; a torn tail is the next open's to cut
        log._unlock()
        return Repair(None, last, torn)
    await log._open_locked()
    try:
        event = LogRepaired(at=at, cut_at=cut_at or 0, folder=mover.folder.name,
                            moved=tuple(mover.moved), problems=tuple(problems))
        [position] = await log.append([event])
        return Repair(event, position, 0)
    finally:
        await log.aclose()

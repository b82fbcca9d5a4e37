"""What only the file log does: segments, repair, locking, other processes, disk faults.

The shared behaviour is in ``test_log_contract.py``; these tests add what the files and the
writer thread make possible (and possible to get wrong).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct
import sys
import textwrap
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xml_pipeline.errors import (
    LogCorruptedError,
    LogDamagedError,
    LogLockedError,
    LogWriteError,
)
from xml_pipeline.events import AgentPaused, Recorded, ReloadRejected
from xml_pipeline.log.file import FileLog, open_file_log, repair_log, verify_log
from xml_pipeline.log.file.places import Places
from xml_pipeline.log.file.segments import HEADER, HEADER_SIZE, locate_record, segments
from xml_pipeline.log.file.snapshots import FileSnapshots
from xml_pipeline.state import State, project, restore

POLICIES = ["always", "batch", "never"]


def paused(n: int, tag: str = "t") -> AgentPaused:
    return AgentPaused(at=1000.0 + n, agent=f"agent-{n}", by=tag, reason="r" * (n % 37))


async def read_all(log: FileLog, after: int = 0) -> list[Recorded]:
    return [record async for record in log.read(after)]


async def build(directory: Path, count: int, *, start: int = 1, segment_bytes: int = 1 << 20,
                fsync: str = "batch", batch: int = 3) -> None:
    """Append ``paused(start) .. paused(start + count - 1)`` in batches, then close."""
    async with await open_file_log(directory, fsync=fsync, segment_bytes=segment_bytes) as log:
        for first in range(start, start + count, batch):
            last = min(first + batch, start + count)
            assert await log.append([paused(n) for n in range(first, last)]) == list(
                range(first, last))


def frames(directory: Path) -> list[tuple[Path, int, int, int]]:
    """``(segment, offset, length, position)`` of every frame, read straight off the disk."""
    found = []
    for _, path in segments(directory):
        buf = path.read_bytes()
        offset = 0
        while len(buf) - offset >= HEADER_SIZE:
            head = HEADER.unpack_from(buf, offset)
            length = HEADER_SIZE + head[2] + head[5]
            found.append((path, offset, length, head[6]))
            offset += length
    return found


def frame_of(directory: Path, position: int) -> tuple[Path, int, int]:
    for path, offset, length, found in frames(directory):
        if found == position:
            return path, offset, length
    raise AssertionError(f"no frame for position {position}")


def disk(directory: Path) -> dict[str, bytes]:
    """Every file of the log (the lock file aside), to show that nothing was changed."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "LOCK"}


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def flip(path: Path, offset: int) -> None:
    byte = path.read_bytes()[offset]
    poke(path, offset, bytes([byte ^ 0x5A]))


# ------------------------------------------------------------------ reopening and segments


@pytest.mark.parametrize("fsync", POLICIES)
async def test_reopening_keeps_everything(tmp_path: Path, fsync: str) -> None:
    for round_ in range(4):
        async with await open_file_log(tmp_path, fsync=fsync) as log:
            assert log.repaired_bytes == 0
            assert log.last_position == round_ * 10
            assert await read_all(log) == [Recorded(n, paused(n))
                                           for n in range(1, round_ * 10 + 1)]
            for n in range(round_ * 10 + 1, round_ * 10 + 11, 5):
                await log.append([paused(p) for p in range(n, n + 5)])
    assert verify_log(tmp_path).ok
    assert verify_log(tmp_path).records == 40


async def test_segments_rotate_and_reads_cross_them(tmp_path: Path) -> None:
    rng = random.Random(7)
    async with await open_file_log(tmp_path, segment_bytes=1024) as log:
        n = 1
        while n <= 300:
            size = min(rng.randint(1, 9), 301 - n)
            assert await log.append([paused(p) for p in range(n, n + size)]) == list(
                range(n, n + size))
            n += size
        listing = segments(tmp_path)
        assert len(listing) > 10
        starts = [first for first, _ in listing]
        # Each file is named by the position of its first record, and the next file starts
        # right after the last record of the one before.
        on_disk = frames(tmp_path)
        for first, path in listing:
            assert [p for s, _, _, p in on_disk if s == path][0] == first
        for (_, earlier), later in zip(listing, starts[1:], strict=False):
            assert [p for s, _, _, p in on_disk if s == earlier][-1] == later - 1
            assert earlier.stat().st_size >= 1024  # rotated only once full
        for after in sorted({0, 1, 299, 300, 301, *starts, *(s - 1 for s in starts),
                             *(s + 1 for s in starts)}):
            got = await read_all(log, after)
            assert [r.position for r in got] == list(range(min(after, 300) + 1, 301))
            assert all(r.event == paused(r.position) for r in got)
    assert verify_log(tmp_path).records == 300
    # Opening with other settings continues the same chain in the last file.
    async with await open_file_log(tmp_path, segment_bytes=1 << 20) as log:
        assert await log.append([paused(301)]) == [301]
    assert segments(tmp_path)[-1][0] == starts[-1]
    assert verify_log(tmp_path).records == 301


async def test_a_read_only_log_reads_across_segments_and_learns_its_last_position(
        tmp_path: Path) -> None:
    await build(tmp_path, 40, segment_bytes=512)
    async with await open_file_log(tmp_path, fsync="always", segment_bytes=512) as writer:
        reader = await open_file_log(tmp_path, readonly=True)
        assert reader.last_position == 40
        await writer.append([paused(41), paused(42)])
        assert [r.position for r in await read_all(reader, after=38)] == [39, 40, 41, 42]
        assert reader.last_position == 42
        with pytest.raises(LogWriteError, match="read-only"):
            await reader.append([paused(43)])
        await reader.aclose()


# ------------------------------------------------------------------ the tail is repaired


Damage = Callable[[Path, int, int], tuple[int, bool]]


def _cut(keep: Callable[[int], int]) -> Damage:
    """Cut the last frame (at ``offset``, ``length`` bytes) down to ``keep(length)`` bytes:
    those bytes are what the repair removes, and the last record is lost."""
    def damage(path: Path, offset: int, length: int) -> tuple[int, bool]:
        os.truncate(path, offset + keep(length))
        return keep(length), False
    return damage


def _append(data: bytes) -> Damage:
    """Garbage after the last frame: only the garbage goes."""
    def damage(path: Path, offset: int, length: int) -> tuple[int, bool]:
        with open(path, "ab") as handle:
            handle.write(data)
        return len(data), True
    return damage


_crc_broken_frame = b"XP\x01\x0b" + struct.pack("<I", 1234) + bytes(60)

TORN = {
    "one byte of a frame": _cut(lambda n: 1),
    "half a header": _cut(lambda n: HEADER_SIZE // 2),
    "a header without data": _cut(lambda n: HEADER_SIZE),
    "all but the last byte": _cut(lambda n: n - 1),
    "zeros after the end": _append(bytes(300)),
    "random bytes after the end": _append(random.Random(3).randbytes(200)),
    "the start of a header": _append(b"XP\x01"),
    "a header whose length runs past the end": _append(
        b"XP\x01\x0b" + struct.pack("<IHI", 1234, 1, 1000) + bytes(50)),
}


@pytest.mark.parametrize("fsync", ["always", "batch"])
@pytest.mark.parametrize("damage", sorted(TORN))
async def test_a_torn_tail_is_cut_on_open_and_appends_continue(
        tmp_path: Path, damage: str, fsync: str) -> None:
    await build(tmp_path, 20, segment_bytes=600)
    path, offset, length = frame_of(tmp_path, 20)
    cut, last_survives = TORN[damage](path, offset, length)
    intact = 20 if last_survives else 19
    async with await open_file_log(tmp_path, fsync=fsync, segment_bytes=600) as log:
        assert log.repaired_bytes == cut
        assert log.last_position == intact
        assert await log.append([paused(100), paused(101)]) == [intact + 1, intact + 2]
        expected = [paused(n) for n in range(1, intact + 1)] + [paused(100), paused(101)]
        assert [r.event for r in await read_all(log)] == expected
    result = verify_log(tmp_path)
    assert (result.ok, result.records, result.torn_bytes) == (True, intact + 2, 0)
    async with await open_file_log(tmp_path) as log:
        assert log.repaired_bytes == 0
        assert [r.event for r in await read_all(log)] == expected


async def test_a_torn_first_record_of_a_segment_removes_the_segment(tmp_path: Path) -> None:
    await build(tmp_path, 12, segment_bytes=200, batch=1)
    first, path = segments(tmp_path)[-1]
    size = path.stat().st_size
    os.truncate(path, 10)
    assert size > 10
    async with await open_file_log(tmp_path, segment_bytes=200) as log:
        assert log.repaired_bytes == 10
        assert log.last_position == first - 1
        assert not path.exists()  # it held nothing whole
        assert await log.append([paused(500)]) == [first]
    assert verify_log(tmp_path).records == first


# ------------------------------------------------------------------ damage is never cut


async def test_damage_in_the_middle_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    await build(tmp_path, 30, segment_bytes=1 << 20)
    path, offset, length = frame_of(tmp_path, 17)
    flip(path, offset + length - 3)  # inside record 17's data
    before = disk(tmp_path)
    with pytest.raises(LogCorruptedError, match="damaged at position 17") as caught:
        await open_file_log(tmp_path)
    assert caught.value.position == 17
    assert disk(tmp_path) == before
    # A failed open lets go of the lock: once the damage is undone, the log opens.
    flip(path, offset + length - 3)
    async with await open_file_log(tmp_path) as log:
        assert log.repaired_bytes == 0 and log.last_position == 30


DAMAGE = {
    "a byte of the data": lambda offset, length: (offset + length - 2, None),
    "the magic": lambda offset, length: (offset, None),
    "the checksum": lambda offset, length: (offset + 5, None),
    "the position": lambda offset, length: (offset + 14, None),
    # A length that runs past the end looks torn, but good records follow it.
    "the data length": lambda offset, length: (offset + 12, b"\x7f"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_any_damaged_field_with_records_after_it_is_refused(
        tmp_path: Path, damage: str) -> None:
    await build(tmp_path, 12)
    path, offset, length = frame_of(tmp_path, 8)
    where, value = DAMAGE[damage](offset, length)
    if value is None:
        flip(path, where)
    else:
        poke(path, where, value)
    before = disk(tmp_path)
    with pytest.raises(LogCorruptedError) as caught:
        await open_file_log(tmp_path)
    assert caught.value.position == 8
    assert "position 8" in caught.value.message
    assert disk(tmp_path) == before
    # Readers get the same answer: the same check refuses to open the log.
    with pytest.raises(LogCorruptedError) as refused:
        await open_file_log(tmp_path, readonly=True)
    assert refused.value.message == caught.value.message
    assert verify_log(tmp_path).bad_position == 8
    assert disk(tmp_path) == before


async def test_a_well_formed_record_out_of_place_at_the_tail_is_not_cut(
        tmp_path: Path) -> None:
    await build(tmp_path, 6)
    path, offset, length = frame_of(tmp_path, 6)
    frame = bytearray(path.read_bytes()[offset:offset + length])
    frame[14:22] = struct.pack("<Q", 60)  # position 60 where 6 belongs, with a valid checksum
    frame[4:8] = struct.pack("<I", zlib.crc32(bytes(frame[8:])))
    poke(path, offset, bytes(frame))
    before = disk(tmp_path)
    with pytest.raises(LogCorruptedError, match="damaged at position 6") as caught:
        await open_file_log(tmp_path)
    assert caught.value.position == 6
    assert disk(tmp_path) == before


async def test_damage_in_an_earlier_segment_is_found_by_readers(tmp_path: Path) -> None:
    # Inside a record between the first and the last of a sealed segment: opening does not
    # read it (it stays cheap), the deep check and any read that reaches it do.
    await build(tmp_path, 30, segment_bytes=400)
    assert len(segments(tmp_path)) >= 3
    _, path = segments(tmp_path)[0]
    path_, offset, length = frame_of(tmp_path, 2)
    assert path_ == path
    flip(path, offset + length - 1)
    reader = await open_file_log(tmp_path, readonly=True)
    with pytest.raises(LogCorruptedError, match="position 2"):
        await read_all(reader)
    await reader.aclose()
    assert verify_log(tmp_path).bad_position == 2


async def test_a_segment_that_ends_early_is_a_gap_not_the_end(tmp_path: Path) -> None:
    await build(tmp_path, 30, segment_bytes=400, batch=1)
    listing = segments(tmp_path)
    (_, first_segment), (second_start, _) = listing[0], listing[1]
    path, offset, _ = frame_of(tmp_path, second_start - 1)
    assert path == first_segment
    os.truncate(path, offset + 5)  # the last record of the first segment is torn
    for readonly in (True, False):
        with pytest.raises(LogDamagedError) as caught:
            await open_file_log(tmp_path, readonly=readonly)
        assert caught.value.position == second_start - 1
        assert (caught.value.segment, caught.value.offset) == (first_segment.name, offset)
    assert verify_log(tmp_path).bad_position == second_start - 1


# ------------------------------------------------------------------ one writer


async def test_a_second_writer_is_locked_out(tmp_path: Path) -> None:
    async with await open_file_log(tmp_path) as log:
        await log.append([paused(1)])
        with pytest.raises(LogLockedError, match=f"written by process {os.getpid()}"):
            await open_file_log(tmp_path)
        script = textwrap.dedent("""
            import asyncio, sys
            from xml_pipeline.errors import LogLockedError
            from xml_pipeline.log.file import open_file_log
            try:
                asyncio.run(open_file_log(sys.argv[1]))
            except LogLockedError as exc:
                print("locked:", exc.message)
        """)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(tmp_path), stdout=asyncio.subprocess.PIPE)
        out, _ = await child.communicate()
        assert out.decode().startswith(f"locked: The log at {tmp_path} is being written by "
                                       f"process {os.getpid()}")
        # Readers need no lock.
        reader = await open_file_log(tmp_path, readonly=True)
        assert [r.position for r in await read_all(reader)] == [1]
        await reader.aclose()
    async with await open_file_log(tmp_path) as log:
        assert await log.append([paused(2)]) == [2]


FOLLOWER = textwrap.dedent("""
    import asyncio, sys
    from xml_pipeline.log.file import open_file_log

    async def main():
        log = await open_file_log(sys.argv[1], readonly=True)
        existing = [r.position async for r in log.read()]
        print("read", existing[0], existing[-1], len(existing), flush=True)
        async for record in log.follow(after=int(sys.argv[2])):
            print(record.position, record.event.agent, flush=True)

    asyncio.run(main())
""")


async def test_another_process_reads_and_follows_what_this_one_appends(
        tmp_path: Path) -> None:
    async with await open_file_log(tmp_path, fsync="never", segment_bytes=700) as log:
        for n in range(1, 11, 2):
            await log.append([paused(n), paused(n + 1)])
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FOLLOWER, str(tmp_path), "4", stdout=asyncio.subprocess.PIPE)
        assert child.stdout is not None
        try:
            async with asyncio.timeout(60):
                assert (await child.stdout.readline()).split() == [b"read", b"1", b"10", b"10"]
                for n in range(5, 11):
                    assert (await child.stdout.readline()).decode().split() == [
                        str(n), f"agent-{n}"]
                for n in range(11, 71, 3):  # across several segments
                    await log.append([paused(n), paused(n + 1), paused(n + 2)])
                for n in range(11, 71):
                    assert (await child.stdout.readline()).decode().split() == [
                        str(n), f"agent-{n}"]
        finally:
            child.kill()
            await child.wait()
    assert len(segments(tmp_path)) > 3


# ------------------------------------------------------------------ durability


class SyncSpy:
    """Wraps ``os.fdatasync``: remembers how much of each file had been synced."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.synced: dict[str, int] = {}
        self.calls = 0
        self._real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", self)

    def __call__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        self._real(fd)
        self.synced[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))] = size
        self.calls += 1


@pytest.mark.parametrize("fsync", ["always", "batch"])
async def test_an_append_returns_only_after_its_records_are_synced(
        tmp_path: Path, fsync: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = SyncSpy(monkeypatch)
    async with await open_file_log(tmp_path, fsync=fsync, segment_bytes=900) as log:

        async def writer(task: int) -> None:
            for n in range(6):
                positions = await log.append([paused(task * 100 + n)] * (n % 3 + 1))
                segment, offset, _ = locate_record(tmp_path, positions[-1]) or ("", 0, b"")
                assert spy.synced.get(segment, 0) > offset, (task, positions)

        async with asyncio.TaskGroup() as tasks:
            for task in range(12):
                tasks.create_task(writer(task))
        assert log.statistics().fsyncs == spy.calls
        assert spy.calls >= log.statistics().batches


async def test_fsync_never_does_not_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = SyncSpy(monkeypatch)
    async with await open_file_log(tmp_path, fsync="never") as log:
        await log.append([paused(1), paused(2)])
        assert log.statistics().fsyncs == 0
    assert spy.calls == 0


class HeldSync:
    """``os.fdatasync`` that holds the writer inside its first call until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self._real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", self)

    def __call__(self, fd: int) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait()
        self._real(fd)


@pytest.mark.parametrize(("fsync", "syncs"), [("batch", 2), ("always", 21)])
async def test_appends_that_arrive_during_a_sync_share_the_next_one(
        tmp_path: Path, fsync: str, syncs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldSync(monkeypatch)
    async with await open_file_log(tmp_path, fsync=fsync) as log:
        first = log.append_nowait([paused(0)])
        await asyncio.to_thread(held.entered.wait)  # the writer is syncing the first batch
        rest = [log.append_nowait([paused(n), paused(n + 1)]) for n in range(1, 41, 2)]
        held.release.set()
        assert await first == [1]
        assert await asyncio.gather(*rest) == [[n + 1, n + 2] for n in range(1, 41, 2)]
        stats = log.statistics()
        assert (stats.fsyncs, stats.batches) == (syncs, syncs)
        assert stats.largest_batch == (40 if fsync == "batch" else 2)
        assert stats.appended == stats.last_position == 41


# ------------------------------------------------------------------ disk faults


class FaultyDisk:
    """Makes the writer's work on segment files fail with ENOSPC while ``fault`` is set.

    ``fault``: "write" (half of the first write gets through, then writes fail), "sync"
    (writes work, fdatasync fails) or "create" (no new segment file can be made). ``stuck``
    makes the writer's clean-up truncation fail too, so that garbage stays in the file.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fault: str | None = None
        self.stuck = False
        self.failures = 0
        self._partial_done = False
        self._write, self._sync = os.write, os.fdatasync
        self._truncate, self._open = os.ftruncate, os.open
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "fdatasync", self.fdatasync)
        monkeypatch.setattr(os, "ftruncate", self.ftruncate)
        monkeypatch.setattr(os, "open", self.open)

    def set(self, fault: str | None, *, stuck: bool = False) -> None:
        self.fault, self.stuck, self._partial_done = fault, stuck, False

    @staticmethod
    def _segment(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").endswith(".log")
        except OSError:
            return False

    def _enospc(self) -> OSError:
        self.failures += 1
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, fd: int, data: Any) -> int:
        if self.fault == "write" and self._segment(fd):
            if not self._partial_done and len(data) > 1:
                self._partial_done = True
                return self._write(fd, bytes(data[: len(data) // 2]))
            raise self._enospc()
        return self._write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if self.fault == "sync" and self._segment(fd):
            raise self._enospc()
        self._sync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        if self.stuck and self._segment(fd):
            raise self._enospc()
        self._truncate(fd, length)

    def open(self, path: Any, flags: int, mode: int = 0o777, **kwargs: Any) -> int:
        if self.fault == "create" and str(path).endswith(".log") and not os.path.exists(path):
            raise self._enospc()
        return self._open(path, flags, mode, **kwargs)


async def _fault_round(log: FileLog, disk: FaultyDisk, directory: Path, fault: str, *,
                       stuck: bool, concurrent: int) -> None:
    last = log.last_position
    stats = log.statistics()
    sizes = {p.name: p.stat().st_size for _, p in segments(directory)}
    failures = disk.failures
    disk.set(fault, stuck=stuck)
    results = await asyncio.gather(
        *(log.append([paused(900 + i), paused(950 + i)]) for i in range(concurrent)),
        return_exceptions=True)
    assert disk.failures > failures
    for result in results:
        assert isinstance(result, LogWriteError), result
        assert "No space left on device" in result.message
        assert isinstance(result.__cause__, OSError)
        assert result.__cause__.errno == errno.ENOSPC
    # Nothing was acknowledged, nothing is readable, counters did not move.
    assert log.last_position == last
    assert [r.position for r in await read_all(log, after=last)] == []
    assert log.statistics().appended == stats.appended
    if not stuck:  # and the half-written bytes were cut again
        assert {p.name: p.stat().st_size for _, p in segments(directory)
                if p.stat().st_size} == {k: v for k, v in sizes.items() if v}
    disk.set(None)
    # The fault cleared: the next append goes on from the last durable record.
    assert await log.append([paused(last + 1)]) == [last + 1]
    assert verify_log(directory).ok


FAULTS = {
    "fdatasync fails": ("sync", False),
    "a write is cut short": ("write", False),
    "a write is cut short and cannot be undone": ("write", True),
    "no room for a new segment": ("create", False),
}


@pytest.mark.parametrize("fsync", ["always", "batch"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_write_failure_acknowledges_nothing_and_the_log_recovers(
        tmp_path: Path, fsync: str, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    disk_ = FaultyDisk(monkeypatch)
    kind, stuck = FAULTS[fault]
    expected = [paused(n) for n in range(1, 9)]
    async with await open_file_log(tmp_path, fsync=fsync, segment_bytes=500) as log:
        await log.append(expected[:5])
        await log.append(expected[5:])
        for concurrent in (1, 6):
            if kind == "create":
                # Fill the current segment, so that the failing batch needs a new one.
                while segments(tmp_path)[-1][1].stat().st_size < 500:
                    n = log.last_position + 1
                    expected.append(paused(n))
                    await log.append([paused(n)])
            await _fault_round(log, disk_, tmp_path, kind, stuck=stuck, concurrent=concurrent)
            expected.append(paused(log.last_position))
    result = verify_log(tmp_path)
    assert (result.ok, result.records, result.torn_bytes) == (True, len(expected), 0)
    async with await open_file_log(tmp_path) as log:
        assert log.repaired_bytes == 0
        assert [r.event for r in await read_all(log)] == expected


async def test_an_unexpected_writer_error_fails_the_append_instead_of_hanging(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    broken = {"on": True}

    def fdatasync(fd: int) -> None:
        if broken["on"]:
            raise RuntimeError("a bug in the disk layer")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    async with await open_file_log(tmp_path, fsync="always") as log:
        with pytest.raises(LogWriteError, match="a bug in the disk layer"):
            async with asyncio.timeout(30):
                await log.append([paused(1)])
        broken["on"] = False
        assert await log.append([paused(1)]) == [1]
    assert verify_log(tmp_path).records == 1


# ------------------------------------------------------------------ following from memory


async def test_follow_serves_this_processs_appends_from_memory(tmp_path: Path) -> None:
    events = [paused(n) for n in range(1, 301)]
    async with await open_file_log(tmp_path, fsync="never") as log:
        await log.append(events[:5])
        followed: list[Recorded] = []

        async def follower() -> None:
            async for record in log.follow():
                followed.append(record)
                if record.position == len(events):
                    return

        async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
            tasks.create_task(follower())
            for first in range(5, len(events), 7):
                await log.append(events[first:first + 7])
        # In order, each the very event appended: nothing was read back from the disk.
        assert [r.position for r in followed] == list(range(1, len(events) + 1))
        assert all(r.event is e for r, e in zip(followed, events, strict=True))
        # A log opened afterwards reads the same records from the segments.
    async with await open_file_log(tmp_path, readonly=True) as reader:
        assert await read_all(reader) == followed


async def test_a_follower_behind_the_memory_window_reads_from_the_segments(
        tmp_path: Path) -> None:
    # More records than the window keeps, appended before the follower starts.
    events = [paused(n) for n in range(1, 12_001)]
    async with await open_file_log(tmp_path, fsync="never") as log:
        for first in range(0, len(events), 500):
            await log.append(events[first:first + 500])
        followed: list[Recorded] = []
        async with asyncio.timeout(30):
            async for record in log.follow(after=10):
                followed.append(record)
                if record.position == len(events):
                    break
        assert [r.position for r in followed] == list(range(11, len(events) + 1))
        assert [r.event for r in followed] == events[10:]
        from_disk = [r for r, e in zip(followed, events[10:], strict=True) if r.event is not e]
        assert from_disk and from_disk[0].position == 11  # the oldest came from the segments
        assert followed[-1].event is events[-1]  # the newest from memory


async def test_a_follower_never_sees_a_batch_that_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fdatasync
    broken = {"on": False}

    def fdatasync(fd: int) -> None:
        if broken["on"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    async with await open_file_log(tmp_path, fsync="always") as log:
        followed: list[Recorded] = []

        async def follower() -> None:
            async for record in log.follow():
                followed.append(record)
                if record.position == 3:
                    return

        async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
            tasks.create_task(follower())
            await log.append([paused(1)])
            broken["on"] = True
            with pytest.raises(LogWriteError):
                await log.append([paused(666), paused(667)])
            broken["on"] = False
            await log.append([paused(2), paused(3)])
        assert followed == [Recorded(1, paused(1)), Recorded(2, paused(2)),
                            Recorded(3, paused(3))]


# ------------------------------------------------------------------ snapshots


async def save(log: FileLog, state: State) -> bool:
    return await log.snapshots.save(state.position, state.encode())


async def test_a_log_that_lost_a_snapshots_record_is_refused_until_repaired(
        tmp_path: Path) -> None:
    # Events whose fold shows in the state, whatever the organism.
    events = [ReloadRejected(at=2000.0 + n, error=f"problem {n}") for n in range(1, 11)]
    async with await open_file_log(tmp_path) as log:
        await log.append(events)
        state = project(await read_all(log))
        assert state.position == 10
        assert await save(log, state)
        found = await restore(log)
        assert found is not None and found.digest() == state.digest()

    # The log is restored from an older copy: record 10 is gone. The snapshot is not used,
    # and since it shows that record 10 was there, the log is refused: it lost a record.
    path, offset, _ = frame_of(tmp_path, 10)
    os.truncate(path, offset)
    assert await FileSnapshots(tmp_path, Places()).latest() is None
    before = disk(tmp_path)
    for readonly in (False, True):
        with pytest.raises(LogDamagedError) as caught:
            await open_file_log(tmp_path, readonly=readonly)
        assert caught.value.message.startswith(
            f"The log at {tmp_path} is damaged at position 10 ({path.name}, offset {offset}: "
            "the log ends at position 9, but the snapshot "
            "snapshots/00000000000000000010.snapshot includes records up to 10, so they are "
            "missing); it was not changed.")
    assert disk(tmp_path) == before

    # A repair moves the snapshot aside; its record 10 is the repair's.
    repaired = await repair_log(tmp_path, at=3000.0)
    assert repaired.position == 10 and repaired.event is not None
    assert repaired.event.moved == ("snapshots/00000000000000000010.snapshot to "
                                    "damaged-1/snapshots/00000000000000000010.snapshot",)
    async with await open_file_log(tmp_path) as log:
        replayed = project(await read_all(log))
        assert await log.snapshots.latest() is None
        assert replayed.digest() != state.digest()

        # A snapshot of the log as it is now is used again, and an older one still matches.
        assert await save(log, replayed)
        found = await restore(log)
        assert found is not None and found.digest() == replayed.digest()
        assert await save(log, project((await read_all(log))[:9]))
        assert await restore(log, upto=9) is not None


async def test_a_snapshot_finds_its_record_from_the_nearest_known_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import xml_pipeline.log.file.snapshots as snapshots_module

    starts: list[tuple[str, int] | None] = []

    def counting(directory: Path, position: int, *, start: tuple[str, int] | None = None
                 ) -> tuple[str, int, bytes] | None:
        starts.append(start)
        return locate_record(directory, position, start=start)

    monkeypatch.setattr(snapshots_module, "locate_record", counting)
    async with await open_file_log(tmp_path, segment_bytes=4096) as log:
        for first in range(1, 200, 10):
            await log.append([paused(n) for n in range(first, first + 10)])
        assert len(segments(tmp_path)) > 1
        state = project(await read_all(log))
        # The end of a batch: the log knows where it is.
        assert await log.snapshots.save(200, state.encode())
        assert starts == []
        # Inside a batch: read from the end of the batch before it, not from the segment's
        # start; the snapshot is the one a full scan gives.
        for position in (195, 191, 11, 1):
            assert await log.snapshots.save(position, project((await read_all(log))[:position])
                                            .encode())
        ten, hundred_ninety = log.location(10), log.location(190)
        assert ten is not None and hundred_ninety is not None
        assert starts == [hundred_ninety[:2], hundred_ninety[:2], ten[:2], None]
        # The newest two are kept: the two of the highest positions.
        assert sorted(os.listdir(tmp_path / "snapshots")) == [
            "00000000000000000195.snapshot", "00000000000000000200.snapshot"]
        latest = await log.snapshots.latest(upto=199)
        assert latest is not None and latest[0] == 195
        # A record the log lacks: nothing is saved.
        assert await log.snapshots.save(500, b"{}") is False
        assert len(os.listdir(tmp_path / "snapshots")) == 2


async def _records(directory: Path) -> list[Recorded]:
    reader = await open_file_log(directory, readonly=True)
    try:
        return await read_all(reader)
    finally:
        await reader.aclose()


async def test_the_log_knows_where_the_last_record_of_each_batch_is(tmp_path: Path) -> None:
    # Small segments, so that batches land in several files.
    log = await open_file_log(tmp_path / "events", segment_bytes=4096)
    ends = []
    for size in (1, 7, 3, 20, 1, 12):
        positions = await log.append([AgentPaused(at=float(n), agent=f"a{n}", by="x" * 50)
                                      for n in range(size)])
        ends.append(positions[-1])
    assert len(segments(tmp_path / "events")) > 1
    for position in ends:
        # Exactly what reading the segments finds, without reading them.
        assert log.location(position) == locate_record(tmp_path / "events", position)
    assert log.location(ends[3] - 1) is None  # not the end of a batch: read the log for it
    await log.aclose()

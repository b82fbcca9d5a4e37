"""The check every open of a file log makes, the one answer every command gives, and repair.

A log that does not start at record 1, whose segments do not follow one another, whose
last record is damaged (not torn) or that a snapshot contradicts is refused by ``run`` (the
writer's open), ``replay`` and ``tail`` alike, with one message naming the place; nothing is
changed. ``xml-pipeline repair`` moves the damaged part aside, keeps it, and records it.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_organism
from tests.test_file_log import build, disk, flip, frame_of, frames, paused, poke
from xml_pipeline import errors, events
from xml_pipeline.cli import main
from xml_pipeline.events import Recorded
from xml_pipeline.log.file import open_file_log, verify_log
from xml_pipeline.log.file.segments import segments
from xml_pipeline.state import project

SEGMENT = 600  # bytes: 60 records make a dozen segments
RECORDS = 60


def advice(directory: Path) -> str:
    return (f"; it was not changed. Run 'xml-pipeline replay --verify --data {directory}' for "
            f"the full check, then 'xml-pipeline repair --data {directory}' to move the damaged "
            "part aside (it is kept, not deleted), or restore the log from a copy.")


def refusal(directory: Path, position: int, place: str, problem: str) -> str:
    return (f"The log at {directory} is damaged at position {position} ({place}{problem})"
            + advice(directory))


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


async def _records(directory: Path) -> list[Recorded]:
    log = await open_file_log(directory, readonly=True)
    try:
        return [record async for record in log.read()]
    finally:
        await log.aclose()


def records(directory: Path) -> list[Recorded]:
    return asyncio.run(_records(directory))


def make_log(directory: Path, *, snapshot: bool = True, tag: str = "t") -> None:
    """``RECORDS`` records over a dozen segments; with a snapshot of the last, as a graceful
    stop leaves it."""
    async def write() -> None:
        async with await open_file_log(directory, segment_bytes=SEGMENT) as log:
            for first in range(1, RECORDS + 1, 3):
                await log.append([paused(n, tag) for n in range(first, first + 3)])
            if snapshot:
                state = project([record async for record in log.read()])
                assert await log.snapshots.save(state.position, state.encode())

    asyncio.run(write())


def refused_everywhere(directory: Path, capsys: pytest.CaptureFixture[str]
                       ) -> errors.LogDamagedError:
    """Every way of opening the log refuses it with one message, changing nothing."""
    before = disk(directory)
    caught = []
    for readonly in (False, True):  # run's open, then replay's and tail's
        with pytest.raises(errors.LogDamagedError) as refused:
            asyncio.run(open_file_log(directory, readonly=readonly))
        caught.append(refused.value)
    message = caught[0].message
    assert caught[1].message == message
    for command in (["replay"], ["replay", "--json"], ["replay", "--no-snapshot"],
                    ["tail"], ["tail", "--json"]):
        assert run(capsys, *command, "--data", directory) == (1, "", message + "\n"), command
    assert disk(directory) == before
    return caught[0]


# ------------------------------------------------------------------ the log starts at 1


def test_a_log_without_its_first_segment_is_refused_everywhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_log(tmp_path, snapshot=False)
    (_, first_path), (second, second_path) = segments(tmp_path)[:2]
    first_path.unlink()
    error = refused_everywhere(tmp_path, capsys)
    assert error.message == refusal(
        tmp_path, 1, f"{second_path.name}, offset 0: ",
        f"the first segment starts at position {second}, so records 1 to {second - 1} are "
        "missing")
    assert (error.position, error.segment, error.offset) == (1, second_path.name, 0)
    assert isinstance(error, errors.LogCorruptedError)


def test_a_log_whose_segments_are_gone_but_whose_snapshot_is_not_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_log(tmp_path)
    for _, path in segments(tmp_path):
        path.unlink()
    error = refused_everywhere(tmp_path, capsys)
    assert error.message == refusal(
        tmp_path, 1, "", f"the log ends at position 0, but the snapshot "
        f"snapshots/{RECORDS:020d}.snapshot includes records up to {RECORDS}, so they are "
        "missing")


# ------------------------------------------------------------------ a snapshot hides nothing


def _first_and_last(path: Path) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(offset, length, position)`` of the first and the last frame of a segment."""
    found = [(offset, length, position) for segment, offset, length, position
             in frames(path.parent) if segment == path]
    return found[0], found[-1]


def _other_log(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    make_log(other, snapshot=False, tag="u")  # the same sizes, other content
    return other


# Each damages the middle segment and says (position, segment, offset, problem) of the refusal;
# ``segment`` is an index into the segments as they were.
MIDDLE = 4


def _flip_first(d: Path, listing: list[tuple[int, Path]]) -> tuple[int, int, int, str]:
    path = listing[MIDDLE][1]
    (offset, length, position), _ = _first_and_last(path)
    flip(path, offset + length - 2)
    return position, MIDDLE, 0, "its first record fails its check (checksum mismatch)"


def _flip_last(d: Path, listing: list[tuple[int, Path]]) -> tuple[int, int, int, str]:
    path = listing[MIDDLE][1]
    _, (offset, length, position) = _first_and_last(path)
    flip(path, offset + length - 2)
    return (position, MIDDLE, offset, f"the {length} bytes after its last whole record "
            f"(position {position - 1}) are not a record")


def _cut_at_a_record(d: Path, listing: list[tuple[int, Path]]) -> tuple[int, int, int, str]:
    path, following = listing[MIDDLE][1], listing[MIDDLE + 1]
    _, (offset, _, position) = _first_and_last(path)
    os.truncate(path, offset)
    return (position, MIDDLE, offset, f"it ends at position {position - 1}, but the next "
            f"segment {following[1].name} starts at {following[0]}, so records {position} "
            f"to {position} are missing")


def _cut_in_a_record(d: Path, listing: list[tuple[int, Path]]) -> tuple[int, int, int, str]:
    path = listing[MIDDLE][1]
    _, (offset, length, position) = _first_and_last(path)
    os.truncate(path, offset + length // 2)
    return (position, MIDDLE, offset, f"the {length // 2} bytes after its last whole record "
            f"(position {position - 1}) are not a record")


def _delete(d: Path, listing: list[tuple[int, Path]]) -> tuple[int, int, int, str]:
    first, path = listing[MIDDLE]
    path.unlink()
    following, following_path = listing[MIDDLE + 1]
    return (first, MIDDLE - 1, listing[MIDDLE - 1][1].stat().st_size,
            f"it ends at position {first - 1}, but the next segment {following_path.name} "
            f"starts at {following}, so records {first} to {following - 1} are missing")


def _copy_of_another(d: Path, listing: list[tuple[int, Path]]) -> tuple[int, int, int, str]:
    first, path = listing[MIDDLE]
    other_first, other = listing[1]
    path.write_bytes(other.read_bytes())
    return (first, MIDDLE, 0, f"its first record holds position {other_first}, where its name "
            f"says {first}")


def _garbage(d: Path, listing: list[tuple[int, Path]]) -> tuple[int, int, int, str]:
    path = listing[MIDDLE][1]
    size = path.stat().st_size
    _, (_, _, position) = _first_and_last(path)
    with open(path, "ab") as handle:
        handle.write(b"garbage")
    return (position + 1, MIDDLE, size, f"the 7 bytes after its last whole record (position "
            f"{position}) are not a record")


def _from_another_log(d: Path, listing: list[tuple[int, Path]]) -> tuple[int, int, int, str]:
    first, path = listing[MIDDLE]
    other = _other_log(d)
    path.write_bytes((other / path.name).read_bytes())  # good frames, another chain
    return (first, MIDDLE, 0, "the hash chain is broken: its first record does not follow "
            f"the last record of {listing[MIDDLE - 1][1].name}")


MIDDLE_DAMAGE = {
    "a byte of its first record flipped": _flip_first,
    "a byte of its last record flipped": _flip_last,
    "cut where a record starts": _cut_at_a_record,
    "cut inside a record": _cut_in_a_record,
    "deleted": _delete,
    "replaced by a copy of another segment": _copy_of_another,
    "garbage appended": _garbage,
    "replaced by the same segment of another log": _from_another_log,
}


@pytest.mark.parametrize("damage", sorted(MIDDLE_DAMAGE))
def test_damage_before_a_snapshot_is_refused_naming_the_place(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    directory = tmp_path / "log"
    make_log(directory)
    listing = segments(directory)
    assert len(listing) > MIDDLE + 3
    position, index, offset, problem = MIDDLE_DAMAGE[damage](tmp_path, listing)
    segment = listing[index][1].name
    error = refused_everywhere(directory, capsys)
    assert error.message == refusal(directory, position, f"{segment}, offset {offset}: ",
                                    problem)
    assert (error.position, error.segment, error.offset) == (position, segment, offset)
    # The deep check agrees on the first bad record.
    code, out, _ = run(capsys, "replay", "--verify", "--json", "--data", directory)
    assert code == 1 and json.loads(out)["bad_position"] == position


def test_a_log_that_a_snapshot_contradicts_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "log"
    make_log(directory)
    other = _other_log(tmp_path)
    for _, path in segments(directory):  # another history of the same length and layout
        path.write_bytes((other / path.name).read_bytes())
    assert verify_log(directory).ok
    snapshot = json.loads((directory / "snapshots" / f"{RECORDS:020d}.snapshot").read_bytes())
    frame_path, offset, _ = frame_of(directory, RECORDS)
    ours = verify_log(other)  # the other log's own chain is whole
    assert ours.ok
    error = refused_everywhere(directory, capsys)
    held = _chain_hash(frame_path, offset)
    assert error.message == refusal(
        directory, RECORDS, f"{frame_path.name}, offset {offset}: ",
        f"the snapshot snapshots/{RECORDS:020d}.snapshot recorded the chain hash "
        f"{snapshot['chain_hash'][:16]}... for this record, but the log holds the chain hash "
        f"{held[:16]}...: the history up to it is not the one the snapshot saw")
    code, _, err = run(capsys, "replay", "--verify", "--data", directory)
    assert code == 1
    assert err == (f"The log at {directory} contradicts a snapshot: "
                   f"snapshots/{RECORDS:020d}.snapshot: it records the chain hash "
                   f"{snapshot['chain_hash'][:16]}... for position {RECORDS}, but the log's "
                   f"chain gives {held[:16]}.... Run 'xml-pipeline repair --data {directory}' "
                   "to move the damaged part aside (it is kept, not deleted), or restore the "
                   "log from a copy.\n")


def _chain_hash(path: Path, offset: int) -> str:
    return path.read_bytes()[offset + 30: offset + 46].hex()


def test_opening_reads_only_the_ends_of_sealed_segments(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Garbage over every record between the first and the last of each sealed segment: the
    # open still succeeds, so it never read them. The deep check and reads find it.
    make_log(tmp_path)
    listing = segments(tmp_path)
    for _, path in listing[:-1]:
        (offset, length, _), (last, _, _) = _first_and_last(path)
        if last > offset + length:
            poke(path, offset + length, b"\x5a" * (last - offset - length))
    code, out, _ = run(capsys, "replay", "--json", "--data", tmp_path)  # from the snapshot
    assert (code, json.loads(out)["position"]) == (0, RECORDS)
    assert run(capsys, "replay", "--verify", "--data", tmp_path)[0] == 1
    code, _, err = run(capsys, "replay", "--no-snapshot", "--data", tmp_path)
    assert code == 1 and "The log is damaged at position 2 " in err


# ------------------------------------------------------------------ a damaged last record


def _set_data_length(path: Path, offset: int, change: int) -> None:
    length = struct.unpack_from("<I", path.read_bytes(), offset + 10)[0]
    poke(path, offset + 10, struct.pack("<I", length + change))


WHOLE = "in a whole frame (so it was damaged after it was written)"
LENGTH = ("a damaged length field, in a whole frame (its checksum matches the bytes up to the "
          "end of the file)")
LAST_RECORD = {
    "a byte of its data": (lambda p, o, n: flip(p, o + n - 3), f"checksum mismatch, {WHOLE}"),
    "its magic": (lambda p, o, n: flip(p, o), f"bad frame header, {WHOLE}"),
    "its checksum": (lambda p, o, n: flip(p, o + 5), f"checksum mismatch, {WHOLE}"),
    "its position": (lambda p, o, n: flip(p, o + 14), f"checksum mismatch, {WHOLE}"),
    "its data length, shorter": (lambda p, o, n: _set_data_length(p, o, -1),
                                 f"checksum mismatch, {WHOLE}"),
    "its data length, longer": (lambda p, o, n: _set_data_length(p, o, 1 << 16), LENGTH),
    "its type length, longer": (lambda p, o, n: poke(p, o + 3, b"\xf0"), LENGTH),
}


@pytest.mark.parametrize("damage", sorted(LAST_RECORD))
def test_a_damaged_last_record_is_refused_not_cut(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    asyncio.run(build(tmp_path, 20))
    path, offset, length = frame_of(tmp_path, 20)
    change, problem = LAST_RECORD[damage]
    change(path, offset, length)
    error = refused_everywhere(tmp_path, capsys)
    assert error.message == refusal(tmp_path, 20, f"{path.name}, offset {offset}: ", problem)
    code, out, _ = run(capsys, "replay", "--verify", "--json", "--data", tmp_path)
    assert code == 1 and json.loads(out)["bad_position"] == 20


def _unwritten_end(path: Path, offset: int, length: int, extra: int) -> None:
    """The last ``length // 3`` bytes of the frame and ``extra`` bytes after it are zeros: the
    file grew, but the write never reached them (a power cut)."""
    cut = offset + length - length // 3
    os.truncate(path, cut)
    with open(path, "ab") as handle:
        handle.write(bytes(length // 3 + extra))


TORN_LAST = {
    "its last byte never written": lambda p, o, n: os.truncate(p, o + n - 1),
    "its end zeros": lambda p, o, n: _unwritten_end(p, o, n, 0),
    "its end and what follows zeros": lambda p, o, n: _unwritten_end(p, o, n, 4096),
}


@pytest.mark.parametrize("tear", sorted(TORN_LAST))
def test_a_torn_last_record_is_still_cut(tmp_path: Path, tear: str) -> None:
    asyncio.run(build(tmp_path, 20))
    path, offset, length = frame_of(tmp_path, 20)
    TORN_LAST[tear](path, offset, length)
    torn = path.stat().st_size - offset
    assert verify_log(tmp_path).torn_bytes == torn
    assert [r.position for r in records(tmp_path)] == list(range(1, 20))

    async def reopen() -> None:
        async with await open_file_log(tmp_path) as log:
            assert (log.repaired_bytes, log.last_position) == (torn, 19)

    asyncio.run(reopen())
    assert verify_log(tmp_path).records == 19
    assert path.stat().st_size == offset


# ------------------------------------------------------------------ repair


def test_repair_moves_a_damaged_last_record_aside_and_records_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(build(tmp_path, 20))
    path, offset, length = frame_of(tmp_path, 20)
    flip(path, offset + length - 3)
    damaged = path.read_bytes()[offset:]
    problem = (f"position 20: {path.name}, offset {offset}: checksum mismatch, in a whole "
               "frame (so it was damaged after it was written)")
    moved = (f"{path.name} from offset {offset} ({length} bytes) to "
             f"damaged-1/{path.name}.from-{offset}")
    code, out, err = run(capsys, "repair", "--data", tmp_path)
    assert (code, err) == (0, "")
    assert out == (f"repaired the log at {tmp_path}; what was moved is kept in "
                   f"{tmp_path / 'damaged-1'}\n"
                   f"  found: {problem}\n"
                   f"  moved: {moved}\n"
                   "  records from position 20 on are no longer in the log\n"
                   "LogRepaired recorded at position 20; the log opens again\n")
    assert (tmp_path / "damaged-1" / f"{path.name}.from-{offset}").read_bytes() == damaged
    got = records(tmp_path)
    assert [r.event for r in got[:19]] == [paused(n) for n in range(1, 20)]
    event = got[19].event
    assert isinstance(event, events.LogRepaired) and got[19].position == 20
    assert (event.cut_at, event.folder, event.moved, event.problems) == (
        20, "damaged-1", (moved,), (problem,))
    assert verify_log(tmp_path).ok
    assert run(capsys, "replay", "--data", tmp_path)[0] == 0
    # Nothing more to do.
    before = disk(tmp_path)
    assert run(capsys, "repair", "--data", tmp_path) == (0, (
        f"The log at {tmp_path} passed the full check (every record, the hash chain and the "
        "snapshots); nothing to repair.\n"), "")
    assert disk(tmp_path) == before


def test_repair_leaves_a_torn_tail_to_the_next_open(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(build(tmp_path, 5))
    with open(segments(tmp_path)[-1][1], "ab") as handle:
        handle.write(b"XP\x01")
    before = disk(tmp_path)
    assert run(capsys, "repair", "--data", tmp_path) == (0, (
        f"The log at {tmp_path} passed the full check (every record, the hash chain and the "
        "snapshots); nothing to repair; the 3 incomplete bytes at its end are a torn tail, "
        "which the next open for writing cuts.\n"), "")
    assert disk(tmp_path) == before


def test_repair_refuses_while_the_log_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(build(tmp_path, 5))
    fd = os.open(tmp_path / "LOCK", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, b"4242")
        assert run(capsys, "repair", "--data", tmp_path) == (1, "", (
            f"The log at {tmp_path} is being written by process 4242; stop it first, or read "
            "this log without writing (tail, replay).\n"))
    finally:
        os.close(fd)


def test_repair_moves_only_garbage_when_the_records_after_it_follow_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "log"
    make_log(directory)
    _, _, offset, _ = _garbage(tmp_path, segments(directory))
    segment = segments(directory)[MIDDLE][1].name
    code, out, _ = run(capsys, "repair", "--json", "--data", directory)
    assert code == 0
    assert json.loads(out)["moved"] == [
        f"{segment} from offset {offset} (7 bytes) to damaged-1/{segment}.from-{offset}"]
    assert json.loads(out)["cut_at"] == 0 and json.loads(out)["position"] == RECORDS + 1
    assert (directory / "damaged-1" / f"{segment}.from-{offset}").read_bytes() == b"garbage"
    got = records(directory)
    assert [r.event for r in got[:RECORDS]] == [paused(n) for n in range(1, RECORDS + 1)]
    # The snapshot still holds, and replay starts from it.
    code, out, _ = run(capsys, "replay", "--json", "--data", directory)
    assert code == 0
    assert (json.loads(out)["from_snapshot"], json.loads(out)["position"]) == (
        RECORDS, RECORDS + 1)


def test_repair_after_a_segment_was_deleted_keeps_what_came_before(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "log"
    make_log(directory)
    listing = segments(directory)
    first = listing[MIDDLE][0]
    _delete(tmp_path, listing)
    later = [path.name for _, path in listing[MIDDLE + 1:]]
    code, out, _ = run(capsys, "repair", "--json", "--data", directory)
    assert code == 0
    report = json.loads(out)
    snapshot = f"{RECORDS:020d}.snapshot"
    assert report["cut_at"] == first and report["position"] == first
    assert report["moved"] == [
        *(f"{name} ({(directory / 'damaged-1' / name).stat().st_size} bytes) to "
          f"damaged-1/{name}" for name in later),
        f"snapshots/{snapshot} to damaged-1/snapshots/{snapshot}"]
    assert sorted(p.name for p in (directory / "damaged-1").iterdir()) == sorted(
        [*later, "snapshots"])
    got = records(directory)
    assert [r.event for r in got[:-1]] == [paused(n) for n in range(1, first)]
    assert isinstance(got[-1].event, events.LogRepaired)
    code, out, _ = run(capsys, "replay", "--json", "--data", directory)
    assert (code, json.loads(out)["position"]) == (0, first)


def test_repair_of_a_damaged_record_with_good_ones_after_it_cuts_there(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(build(tmp_path, 20))
    path, offset, length = frame_of(tmp_path, 10)
    flip(path, offset + length - 3)
    size = path.stat().st_size
    code, out, _ = run(capsys, "repair", "--json", "--data", tmp_path)
    assert code == 0
    report = json.loads(out)
    assert (report["cut_at"], report["position"]) == (10, 10)
    assert report["moved"] == [f"{path.name} from offset {offset} ({size - offset} bytes) to "
                               f"damaged-1/{path.name}.from-{offset}"]
    assert [r.position for r in records(tmp_path)] == list(range(1, 11))


# ------------------------------------------------------------------ run refuses it too


def test_run_refuses_a_log_without_its_first_segment_and_leaves_it_alone(
        tmp_path: Path) -> None:
    # The real command: a refused open serves nothing and appends nothing (no
    # OrganismStarted), so an idempotency key cannot make a second message.
    path = write_organism(tmp_path / "org", """
        organism: {name: damaged, log: {path: events}}
        listeners:
          - {name: greeter, description: d, payload: schemas/greeting.xsd, handler: "h:greet"}
        """, modules={"h": "async def greet(payload, ctx):\n    return None\n"})
    directory = tmp_path / "org" / "events"
    make_log(directory, snapshot=False)
    (_, first_path), (second, second_path) = segments(directory)[:2]
    first_path.unlink()
    before = disk(directory)
    result = subprocess.run(
        [sys.executable, "-m", "xml_pipeline", "run", str(path), "--port", "0", "--no-watch"],
        cwd=path.parent, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1  # the organism or its log is invalid: one line, no traceback
    assert "Traceback" not in result.stderr
    assert refusal(directory, 1, f"{second_path.name}, offset 0: ",
                   f"the first segment starts at position {second}, so records 1 to "
                   f"{second - 1} are missing") in result.stderr
    assert disk(directory) == before

"""Periodic snapshots: a running pump has its log keep one every ``snapshot_every`` records,
so that a start after a crash replays only what follows it. A snapshot plus the rest of the
log equals a replay from zero; a snapshot that cannot be written changes nothing else. Most
run on the file log, whose snapshots are files; one runs the same on the memory log."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import handlers
from tests.conftest import ROOT, write_organism
from tests.test_pump import ITEM_XSD, ORGANISM, item
from xml_pipeline.config import load_organism
from xml_pipeline.events import Event, OrganismStopped
from xml_pipeline.log import EventLog
from xml_pipeline.log.file import FileLog, open_file_log
from xml_pipeline.log.file.snapshots import FileSnapshots
from xml_pipeline.log.memory import MemoryLog
from xml_pipeline.runtime.pump import Pump, open_pump
from xml_pipeline.state import State, replay, restore

EVERY = 50
MESSAGES = 40  # three hops each: several hundred records, several snapshots
BOUND = 60.0  # seconds; only turns a hang into a failure, never a timing assertion

# Runs a pump with periodic snapshots in a child process, which the test then SIGKILLs.
CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from xml_pipeline.log.file import open_file_log
    from xml_pipeline.config import load_organism
    from xml_pipeline.runtime.pump import open_pump

    async def main(organism: Path, data: Path) -> None:
        log = await open_file_log(data)
        async with open_pump(load_organism(organism), log, snapshot_every={every}) as pump:
            for k in range({messages}):
                await pump.inject(f"<Item><n>{{k}}</n></Item>", to="first")
            await pump.wait_idle()
            await pump.wait_until(lambda: any((data / "snapshots").glob("*.snapshot")))
            await pump.inject("<Item><n>tail</n></Item>", to="first")
            await pump.wait_idle()
            print("ready", flush=True)
            await asyncio.Event().wait()  # until killed

    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
""").format(every=EVERY, messages=MESSAGES)


@pytest.fixture
def organism_path(tmp_path: Path) -> Path:
    handlers.reset()
    return write_organism(tmp_path / "org", ORGANISM, schemas={"item.xsd": ITEM_XSD})


def snapshot_files(log: FileLog) -> list[Path]:
    return sorted((log.directory / "snapshots").glob("*.snapshot"))


async def wait_until(pump: Pump, condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds; the pump signals every change, a finished snapshot
    write included. The bound only turns a hang into a failure."""
    async with asyncio.timeout(BOUND):
        await pump.wait_until(condition)


async def inject_conversations(pump: Pump, count: int, *, first: int = 0) -> None:
    for k in range(first, first + count):
        await pump.inject(item(k), to="first")
    await pump.wait_idle()


async def latest(log: EventLog) -> State:
    snapshot = await restore(log)
    assert snapshot is not None
    return snapshot


async def test_a_running_pump_saves_snapshots_that_resume_to_the_same_state(
        organism_path: Path, log: FileLog) -> None:
    async with open_pump(load_organism(organism_path), log, snapshot_every=EVERY) as pump:
        await inject_conversations(pump, MESSAGES)
        # Saved while running (no stop yet); only the newest two are kept.
        await wait_until(pump, lambda: bool(snapshot_files(log)))
        await wait_until(pump, lambda: not pump.snapshotting)
        files = snapshot_files(log)
        assert 1 <= len(files) <= 2
        snapshot = await latest(log)
        assert EVERY <= snapshot.position <= pump.state.position
        assert f"{snapshot.position:020d}.snapshot" == files[-1].name
        resumed = await replay(log, state=snapshot)
        from_zero = await replay(log)
        assert resumed.position == from_zero.position == pump.state.position
        assert resumed.digest() == from_zero.digest() == pump.state.digest()


async def test_the_memory_log_keeps_the_pumps_snapshots_and_a_restart_uses_them(
        organism_path: Path) -> None:
    log = MemoryLog()
    organism = load_organism(organism_path)
    async with open_pump(organism, log, snapshot_every=EVERY) as pump:
        await inject_conversations(pump, MESSAGES)
        await wait_until(pump, lambda: not pump.snapshotting)
        periodic = await latest(log)
        assert EVERY <= periodic.position <= pump.state.position
    final = await latest(log)
    assert final.position == log.last_position
    async with open_pump(organism, log, snapshot_every=EVERY) as pump:
        assert pump.replayed_from == final.position
        from_zero = await replay(log)
        assert from_zero.digest() == pump.state.digest()


async def test_no_periodic_snapshot_when_disabled(organism_path: Path, log: FileLog) -> None:
    async with open_pump(load_organism(organism_path), log, snapshot_every=0) as pump:
        await inject_conversations(pump, 10)
        assert pump.state.position > 100
        assert not pump.snapshotting
        assert snapshot_files(log) == []
    assert len(snapshot_files(log)) == 1  # the one saved on the graceful stop


async def test_a_graceful_stop_waits_for_a_periodic_snapshot_then_saves_its_own(
        organism_path: Path, log: FileLog, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    calls: list[tuple[str, int]] = []

    real = FileSnapshots._write

    def held_write(self: FileSnapshots, position: int, state: bytes,
                   location: tuple[str, int, bytes]) -> None:
        calls.append(("start", position))
        if len(calls) == 1:  # the first periodic write stays in flight until the stop begins
            release.wait(BOUND)
        try:
            real(self, position, state, location)
        finally:
            calls.append(("end", position))

    def on_event(position: int, event: Event) -> None:
        if isinstance(event, OrganismStopped):
            release.set()

    monkeypatch.setattr(FileSnapshots, "_write", held_write)
    async with open_pump(load_organism(organism_path), log, snapshot_every=EVERY) as pump:
        pump.observe(on_event)
        await inject_conversations(pump, 10)
        assert pump.snapshotting  # one in flight; no second one meanwhile
    periodic, final = calls[0][1], log.last_position
    assert EVERY <= periodic < final
    assert calls == [("start", periodic), ("end", periodic), ("start", final), ("end", final)]
    assert (await latest(log)).position == final


async def test_a_snapshot_that_cannot_be_written_changes_nothing_else(
        organism_path: Path, log: FileLog, caplog: pytest.LogCaptureFixture) -> None:
    (log.directory / "snapshots").write_text("a file where the folder should be")
    caplog.set_level(logging.WARNING, logger="xml_pipeline.runtime.pump")

    def warned() -> bool:
        return any(r.getMessage().startswith("could not save a snapshot of position ")
                   for r in caplog.records)

    async with open_pump(load_organism(organism_path), log, snapshot_every=EVERY) as pump:
        await inject_conversations(pump, 10)
        await wait_until(pump, warned)
        warning = next(r for r in caplog.records if r.getMessage().startswith("could not"))
        assert warning.levelno == logging.WARNING
        assert str(log.directory) in warning.getMessage()
        # The pump goes on: messages flow, and a later snapshot is tried again (and fails).
        await wait_until(pump, lambda: not pump.snapshotting)
        caplog.clear()
        await inject_conversations(pump, 10, first=10)
        assert pump.fault is None
        assert len([s for s in handlers.seen if s["listener"] == "third"]) == 20
        more = 20
        while not warned():
            await inject_conversations(pump, 1, first=more)
            more += 1
        replayed = await replay(log)
        assert replayed.digest() == pump.state.digest()
    assert (log.directory / "snapshots").is_file()
    assert await log.snapshots.latest() is None


async def test_a_restart_after_sigkill_resumes_from_the_periodic_snapshot(
        organism_path: Path, tmp_path: Path) -> None:
    data = tmp_path / "events"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(organism_path), str(data), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert child.stdout is not None
        seen = b""
        async with asyncio.timeout(BOUND):
            while (line := await child.stdout.readline()) != b"ready\n":
                seen += line
                assert line, f"the child did not get ready:\n{seen.decode()}"
    finally:
        child.kill()  # no graceful stop: no OrganismStopped, no final snapshot
        await child.wait()

    log = await open_file_log(data)
    try:
        snapshot = await latest(log)
        assert snapshot.position >= EVERY
        records = [r async for r in log.read()]
        assert not isinstance(records[-1].event, OrganismStopped)
        assert snapshot.position <= records[-1].position
        async with open_pump(load_organism(organism_path), log, snapshot_every=EVERY) as pump:
            assert pump.replayed_from == snapshot.position
            await inject_conversations(pump, 1, first=MESSAGES)
            from_zero = await replay(log)
            assert from_zero.position == pump.state.position
            assert from_zero.digest() == pump.state.digest()
    finally:
        await log.aclose()


async def test_a_reload_changes_how_often_snapshots_are_taken(
        organism_path: Path, log: FileLog) -> None:
    from xml_pipeline.runtime.reload import reload_organism

    async with open_pump(load_organism(organism_path), log, snapshot_every=10**9) as pump:
        await inject_conversations(pump, 2)
        assert not snapshot_files(log)
        text = organism_path.read_text()
        organism_path.write_text(text.replace(
            "organism: {name: pump-test}",
            f"organism: {{name: pump-test, log: {{snapshot_every: {EVERY}}}}}"))
        result = await reload_organism(pump)
        assert result.success and result.restart_needed == ()
        assert pump.snapshot_every == EVERY
        await inject_conversations(pump, MESSAGES)
        # taken while running, at the new pace
        await pump.wait_until(lambda: bool(snapshot_files(log)))
        organism_path.write_text(text.replace(
            "organism: {name: pump-test}",
            "organism: {name: pump-test, log: {snapshot_every: 0, fsync: always}}"))
        result = await reload_organism(pump)
        # fsync is a setting of the open log: it waits for a restart, and says so.
        assert result.success and result.restart_needed == ("log.fsync",)
        assert pump.snapshot_every == 0
        await pump.wait_until(lambda: not pump.snapshotting)  # one started before may finish
        before = snapshot_files(log)
        await inject_conversations(pump, MESSAGES)
        await pump.wait_idle()
        assert snapshot_files(log) == before


async def test_periodic_snapshots_never_scan_a_segment_to_find_their_record(
        organism_path: Path, log: FileLog, monkeypatch: pytest.MonkeyPatch) -> None:
    import xml_pipeline.log.file.snapshots as snapshots_module

    scans: list[int] = []
    real = snapshots_module.locate_record

    def counting(directory: Path, position: int, *, start: tuple[str, int] | None = None
                 ) -> tuple[str, int, bytes] | None:
        if start is None:
            scans.append(position)
        return real(directory, position, start=start)

    monkeypatch.setattr(snapshots_module, "locate_record", counting)
    async with open_pump(load_organism(organism_path), log, snapshot_every=EVERY) as pump:
        await inject_conversations(pump, MESSAGES)
        await pump.wait_until(lambda: len(snapshot_files(log)) >= 2)
        # Each found its record where the log knew it was, or read on from the end of the
        # write batch before it: never a segment from its start.
        assert scans == []

"""The ``EventLog`` contract: every backend passes this one suite (style item 6).

A backend joins by adding one entry to ``BACKENDS``: an async factory that opens a log for the
test (it may pull other fixtures, such as a server, through ``request.getfixturevalue``), plus
whether the log survives being closed and opened again. Everything below talks to the log
only through the protocol in ``xml_pipeline.log``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.shared_log import SharedLog
from xml_pipeline.errors import LogClosedError
from xml_pipeline.events import CATALOGUE, AgentPaused, Event, Recorded
from xml_pipeline.log import EventLog, LogStatistics
from xml_pipeline.log.file import open_file_log
from xml_pipeline.log.memory import MemoryLog

Opener = Callable[[pytest.FixtureRequest], Awaitable[EventLog]]


async def _open_memory(request: pytest.FixtureRequest) -> EventLog:
    return MemoryLog()


async def _open_shared(request: pytest.FixtureRequest) -> EventLog:
    return SharedLog().connect()  # type: ignore[return-value]  # a test double


def _file_opener(fsync: str) -> Opener:
    async def open_log(request: pytest.FixtureRequest) -> EventLog:
        directory = request.getfixturevalue("tmp_path") / "log"
        # Small segments, so that every contract test also reads and follows across files.
        return await open_file_log(directory, fsync=fsync, segment_bytes=2048)

    return open_log


@dataclass(frozen=True)
class Backend:
    open: Opener
    durable: bool  # closing and opening again keeps the records


BACKENDS: dict[str, Backend] = {
    "memory": Backend(open=_open_memory, durable=False),
    "shared": Backend(open=_open_shared, durable=False),
    "file-always": Backend(open=_file_opener("always"), durable=True),
    "file-batch": Backend(open=_file_opener("batch"), durable=True),
    "file-never": Backend(open=_file_opener("never"), durable=True),
}


class Harness:
    """The backend under test: opens logs, and closes every one it opened at teardown."""

    def __init__(self, name: str, backend: Backend, request: pytest.FixtureRequest) -> None:
        self.name = name
        self.backend = backend
        self._request = request
        self._opened: list[EventLog] = []

    async def open(self) -> EventLog:
        log = await self.backend.open(self._request)
        self._opened.append(log)
        return log

    async def reopen(self, log: EventLog) -> EventLog:
        """Close ``log`` and open the same log again (durable backends only)."""
        if not self.backend.durable:
            pytest.skip(f"the {self.name} log does not outlive being closed")
        await log.aclose()
        return await self.open()

    async def close_all(self) -> None:
        for log in self._opened:
            await log.aclose()


@pytest.fixture(params=sorted(BACKENDS))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h = Harness(request.param, BACKENDS[request.param], request)
    yield h
    await h.close_all()


@pytest.fixture
async def log(harness: Harness) -> EventLog:
    return await harness.open()


# ------------------------------------------------------------------ helpers


def paused(n: int, tag: str = "t") -> AgentPaused:
    """An event whose content is derived from ``n`` (so any mix-up is visible)."""
    return AgentPaused(at=1000.0 + n, agent=f"agent-{n}", by=tag, reason="r" * (n % 37))


async def read_all(log: EventLog, after: int = 0) -> list[Recorded]:
    return [record async for record in log.read(after)]


def _sample_value(hint: Any, name: str) -> Any:
    """A non-default value of type ``hint`` that exercises the encoding (quotes, XML, unicode)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _sample_value(options[0], name)
    if hint is str:
        return f'{name} "quoted" <x a=\'1\'>&amp;</x> \u00e9\u4e2d\U0001f600\n\ttab'
    if hint is bool:
        return True
    if hint is int:
        return 2**40 + 7
    if hint is float:
        return 12345.678901
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return (_sample_value(item, name), _sample_value(item, f"{name}-second"))
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_sample_value(item, name), _sample_value(item, f"{name}-second")]
    if origin is dict:
        _, value_hint = typing.get_args(hint)
        return {"k1": _sample_value(value_hint, name), "k2": _sample_value(value_hint, name)}
    if hint is Any:
        return {"nested": [1, 2.5, "three", None, True, {"deep": "x"}]}
    raise AssertionError(f"no sample for {hint!r} ({name}); extend _sample_value")


def sample_event(cls: type[Event], n: int) -> Event:
    hints = typing.get_type_hints(cls)
    values = {f.name: _sample_value(hints[f.name], f.name) for f in dataclasses.fields(cls)}
    values["at"] = 1_700_000_000.123456 + n
    return cls(**values)


# ------------------------------------------------------------------ the contract


async def test_a_new_log_is_empty(log: EventLog) -> None:
    assert isinstance(log, EventLog)
    assert log.last_position == 0
    assert await read_all(log) == []
    assert log.statistics().last_position == 0


async def test_positions_are_consecutive_from_one(log: EventLog) -> None:
    assert await log.append([paused(1)]) == [1]
    assert await log.append([paused(2), paused(3), paused(4)]) == [2, 3, 4]
    assert await log.append([paused(5), paused(6)]) == [5, 6]
    assert log.last_position == 6


async def test_an_append_is_readable_as_soon_as_it_returns(log: EventLog) -> None:
    for n in range(1, 40):
        batch = [paused(n * 10 + i) for i in range(n % 4 + 1)]
        positions = await log.append(batch)
        assert log.last_position == positions[-1]
        tail = await read_all(log, after=positions[0] - 1)
        assert tail == [Recorded(p, e) for p, e in zip(positions, batch, strict=True)]


async def test_read_after_yields_the_records_after_it_in_order(log: EventLog) -> None:
    events = [paused(n) for n in range(1, 31)]
    for start in range(0, 30, 7):
        await log.append(events[start:start + 7])
    for after in [-5, -1, 0, 1, 2, 13, 14, 15, 28, 29, 30, 31, 100]:
        got = await read_all(log, after)
        first = min(max(after, 0), 30)
        assert [r.position for r in got] == list(range(first + 1, 31)), after
        assert [r.event for r in got] == events[first:], after


async def test_read_ends_even_while_appends_go_on(log: EventLog) -> None:
    await log.append([paused(n) for n in range(1, 6)])
    seen = []
    async for record in log.read():
        seen.append(record.position)
        if record.position == 2:
            await log.append([paused(6)])
    # The read ended by itself; it saw everything that existed when it got there.
    assert seen[:5] == [1, 2, 3, 4, 5]
    assert seen == list(range(1, len(seen) + 1))


async def test_read_with_the_default_starts_at_the_beginning(log: EventLog) -> None:
    await log.append([paused(1), paused(2)])
    assert [r.position async for r in log.read()] == [1, 2]


async def test_follow_yields_existing_then_new_records_and_ends_on_close(
        log: EventLog) -> None:
    await log.append([paused(n) for n in range(1, 4)])
    got: asyncio.Queue[Recorded] = asyncio.Queue()

    async def follower() -> str:
        async for record in log.follow():
            got.put_nowait(record)
        return "ended"

    async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
        task = tasks.create_task(follower())
        assert [(await got.get()).position for _ in range(3)] == [1, 2, 3]
        for n in range(4, 40, 3):
            batch = [paused(n), paused(n + 1), paused(n + 2)]
            await log.append(batch)
            received = [await got.get() for _ in range(3)]
            assert received == [Recorded(n + i, e) for i, e in enumerate(batch)]
        await log.aclose()
    assert task.result() == "ended"
    assert got.empty()


async def test_follow_from_a_position_and_from_beyond_the_end(log: EventLog) -> None:
    await log.append([paused(n) for n in range(1, 5)])
    near: asyncio.Queue[int] = asyncio.Queue()
    far: asyncio.Queue[int] = asyncio.Queue()

    async def follower(after: int, queue: asyncio.Queue[int]) -> None:
        async for record in log.follow(after):
            assert record.event == paused(record.position)
            queue.put_nowait(record.position)

    async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
        tasks.create_task(follower(2, near))
        tasks.create_task(follower(60, far))  # beyond the end: waits for position 61
        assert [await near.get() for _ in range(2)] == [3, 4]
        for n in range(5, 81, 4):
            await log.append([paused(p) for p in range(n, n + 4)])
        assert [await near.get() for _ in range(76)] == list(range(5, 81))
        assert [await far.get() for _ in range(20)] == list(range(61, 81))
        await log.aclose()
    assert near.empty() and far.empty()


async def test_many_followers_see_the_same_sequence(log: EventLog) -> None:
    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(5)]

    async def follower(queue: asyncio.Queue[int]) -> None:
        async for record in log.follow():
            queue.put_nowait(record.position)

    async with asyncio.timeout(30), asyncio.TaskGroup() as tasks:
        for queue in queues:
            tasks.create_task(follower(queue))
        for n in range(1, 51, 5):
            await log.append([paused(p) for p in range(n, n + 5)])
        for queue in queues:
            assert [await queue.get() for _ in range(50)] == list(range(1, 51))
        await log.aclose()


async def test_follow_on_a_closed_log_yields_what_exists_and_ends(log: EventLog) -> None:
    await log.append([paused(1), paused(2)])
    await log.aclose()
    async with asyncio.timeout(30):
        assert [r.position async for r in log.follow()] == [1, 2]


async def test_concurrent_appends_keep_order_and_never_interleave_a_batch(
        log: EventLog) -> None:
    rng = random.Random(1234)
    plans = {task: [rng.randint(1, 6) for _ in range(8)] for task in range(40)}
    results: dict[int, list[tuple[list[AgentPaused], list[int]]]] = {t: [] for t in plans}

    async def writer(task: int) -> None:
        for index, size in enumerate(plans[task]):
            batch = [AgentPaused(at=float(i), agent=f"task-{task}", by=f"batch-{index}",
                                 reason=str(i)) for i in range(size)]
            results[task].append((batch, await log.append(batch)))

    async with asyncio.timeout(60), asyncio.TaskGroup() as tasks:
        for task in plans:
            tasks.create_task(writer(task))

    total = sum(sum(sizes) for sizes in plans.values())
    assert log.last_position == total
    records = {r.position: r.event for r in await read_all(log)}
    assert sorted(records) == list(range(1, total + 1))
    for task, appended in results.items():
        previous = 0
        for batch, positions in appended:
            # One batch, one unbroken run of positions, after the task's earlier batches.
            assert positions == list(range(positions[0], positions[0] + len(batch))), task
            assert positions[0] > previous
            previous = positions[-1]
            assert [records[p] for p in positions] == batch


async def test_appending_nothing_changes_nothing(log: EventLog) -> None:
    assert await log.append([]) == []
    assert log.last_position == 0
    await log.append([paused(1), paused(2)])
    before = log.statistics()
    assert await log.append([]) == []
    assert await log.append(()) == []
    assert log.last_position == 2
    assert log.statistics() == before
    assert await log.append([paused(3)]) == [3]
    assert [r.position for r in await read_all(log)] == [1, 2, 3]


async def test_every_event_type_reads_back_equal(log: EventLog) -> None:
    events = [sample_event(cls, n) for n, cls in enumerate(CATALOGUE.values())]
    events += [dataclasses.replace(paused(1), reason=""), paused(99, tag="")]
    positions = await log.append(events)
    got = await read_all(log)
    assert got == [Recorded(p, e) for p, e in zip(positions, events, strict=True)]
    assert [type(r.event) for r in got] == [type(e) for e in events]


async def test_an_event_outside_the_catalogue_is_refused_and_nothing_is_appended(
        log: EventLog) -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class SomethingHappened(Event):
        what: str

    await log.append([paused(1)])
    with pytest.raises(TypeError, match="SomethingHappened is not in the event catalogue"):
        await log.append([paused(2), SomethingHappened(at=1.0, what="x")])
    assert log.last_position == 1
    assert await log.append([paused(2)]) == [2]
    assert [r.event for r in await read_all(log)] == [paused(1), paused(2)]


async def test_statistics_is_a_frozen_value(log: EventLog) -> None:
    for size in (1, 4, 2):
        await log.append([paused(n) for n in range(size)])
    stats = log.statistics()
    assert isinstance(stats, LogStatistics)
    assert stats.last_position == 7
    assert stats.appended == 7
    assert stats.batches == 3  # awaited one after another: nothing to group
    assert stats.largest_batch == 4
    assert stats.fsyncs >= 0 and stats.bytes_written >= 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.appended = 0  # type: ignore[misc]
    await log.append([paused(8)])
    assert stats.appended == 7  # a value, not a view
    assert log.statistics().appended == 8


async def test_a_closed_log_refuses_appends(log: EventLog) -> None:
    await log.append([paused(1)])
    await log.aclose()
    await log.aclose()  # closing twice is harmless
    with pytest.raises(LogClosedError):
        await log.append([paused(2)])
    with pytest.raises(LogClosedError):
        await log.append([])


async def test_a_caller_that_stops_waiting_leaves_no_gap(log: EventLog) -> None:
    await log.append([paused(1)])
    tasks = [asyncio.create_task(log.append([paused(n)])) for n in range(2, 12)]
    tasks[3].cancel()
    tasks[7].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    last = log.last_position
    assert (await log.append([paused(100)])) == [last + 1]
    positions = [r.position for r in await read_all(log)]
    assert positions == list(range(1, last + 2))


async def test_records_outlive_closing_and_opening_again(harness: Harness) -> None:
    log = await harness.open()
    events = [paused(n) for n in range(1, 26)]
    for start in range(0, 25, 5):
        await log.append(events[start:start + 5])
    log = await harness.reopen(log)
    assert log.last_position == 25
    assert await read_all(log) == [Recorded(n, e) for n, e in enumerate(events, start=1)]
    assert await log.append([paused(26)]) == [26]
    log = await harness.reopen(log)
    assert [r.event for r in await read_all(log, after=24)] == [paused(25), paused(26)]


async def test_append_nowait_orders_records_as_the_calls_were_made(log: EventLog) -> None:
    await log.append([paused(1)])
    futures = [log.append_nowait([paused(n), paused(n + 1)]) for n in range(2, 40, 2)]
    futures.insert(5, log.append_nowait([]))
    results = await asyncio.gather(*futures)
    assert results.pop(5) == []
    assert results == [[n, n + 1] for n in range(2, 40, 2)]
    assert log.last_position == 39
    assert await read_all(log) == [Recorded(n, paused(n)) for n in range(1, 40)]


async def test_append_nowait_on_a_closed_log_raises_at_once(log: EventLog) -> None:
    await log.aclose()
    with pytest.raises(LogClosedError):
        log.append_nowait([paused(1)])


# ------------------------------------------------------------------ snapshots and probe


async def test_a_new_log_has_no_snapshot(log: EventLog) -> None:
    assert await log.snapshots.latest() is None
    await log.append([paused(1)])
    assert await log.snapshots.latest() is None


async def test_a_saved_snapshot_comes_back_as_it_was_saved(log: EventLog) -> None:
    await log.append([paused(n) for n in range(1, 6)])
    state = b'{"position":5,"anything":["the state layer\'s business"]}'
    assert await log.snapshots.save(5, state) is True
    assert await log.snapshots.latest() == (5, state)
    # The newest wins, whatever the order of saving.
    await log.append([paused(n) for n in range(6, 9)])
    assert await log.snapshots.save(8, b'{"at":8}') is True
    assert await log.snapshots.latest() == (8, b'{"at":8}')


async def test_latest_upto_passes_over_newer_snapshots(log: EventLog) -> None:
    await log.append([paused(n) for n in range(1, 11)])
    assert await log.snapshots.save(4, b'{"at":4}')
    assert await log.snapshots.save(9, b'{"at":9}')
    assert await log.snapshots.latest(upto=10) == (9, b'{"at":9}')
    assert await log.snapshots.latest(upto=9) == (9, b'{"at":9}')
    assert await log.snapshots.latest(upto=8) == (4, b'{"at":4}')
    assert await log.snapshots.latest(upto=3) is None


async def test_a_snapshot_of_a_record_the_log_lacks_is_not_saved(log: EventLog) -> None:
    assert await log.snapshots.save(1, b"{}") is False
    await log.append([paused(1), paused(2)])
    assert await log.snapshots.save(3, b"{}") is False
    assert await log.snapshots.save(0, b"{}") is False
    assert await log.snapshots.latest() is None
    assert await log.snapshots.save(2, b"{}") is True
    assert await log.snapshots.latest() == (2, b"{}")


async def test_snapshots_outlive_closing_and_opening_again(harness: Harness) -> None:
    log = await harness.open()
    await log.append([paused(n) for n in range(1, 4)])
    assert await log.snapshots.save(3, b'{"at":3}')
    log = await harness.reopen(log)
    assert await log.snapshots.latest() == (3, b'{"at":3}')


async def test_probe_returns_while_the_log_can_be_written(log: EventLog) -> None:
    await log.probe()
    await log.append([paused(1)])
    await log.probe()
    assert await log.append([paused(2)]) == [2]
    assert [r.position for r in await read_all(log)] == [1, 2]

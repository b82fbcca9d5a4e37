"""Nothing acknowledged is lost when the writing process is killed (design principle 3).

A child process appends to a file log as fast as it can (several tasks, batches of various
sizes) and prints each range of positions after ``append`` returned it. The parent kills it
with SIGKILL after a random number of those lines, then opens the log itself: the hash chain
must verify, every acknowledged record must be there with exactly the content written, and
the log must hold nothing else than whole batches in the order they were appended.

A killed process cannot lose what reached the OS, so some rounds also simulate a power cut:
the last segment is cut at a random point after the last acknowledged (hence synced) record.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from xml_pipeline.events import AgentPaused, Recorded
from xml_pipeline.log.file import open_file_log, verify_log
from xml_pipeline.log.file.segments import HEADER, locate_record, segments

ROUNDS = 24
SEGMENT_BYTES = 8192  # small, so that kills also land around segment rotation

WRITER = textwrap.dedent("""
    import asyncio, random, sys
    from xml_pipeline.events import AgentPaused
    from xml_pipeline.log.file import open_file_log

    def event(round_, counter):
        return AgentPaused(at=float(counter), agent=f"r{round_}-c{counter}",
                           by=f"round-{round_}", reason="x" * (counter * 7 % 300))

    async def main():
        directory, round_, seed, fsync, segment_bytes = sys.argv[1:]
        round_ = int(round_)
        rng = random.Random(int(seed))
        log = await open_file_log(directory, fsync=fsync, segment_bytes=int(segment_bytes))
        print("open", log.last_position, flush=True)
        counter = 0

        async def writer():
            nonlocal counter
            while True:
                size = rng.choice((1, 1, 2, 3, 5, 8, 13, 40, 200))
                first, counter = counter, counter + size
                batch = [event(round_, c) for c in range(first, first + size)]
                positions = await log.append(batch)
                print(first, positions[0], len(positions), flush=True)

        async with asyncio.TaskGroup() as tasks:
            for _ in range(4):
                tasks.create_task(writer())

    asyncio.run(main())
""")


def event(round_: int, counter: int) -> AgentPaused:
    """What the child appends as its ``counter``-th event in ``round_`` (kept in step with
    ``WRITER``)."""
    return AgentPaused(at=float(counter), agent=f"r{round_}-c{counter}", by=f"round-{round_}",
                       reason="x" * (counter * 7 % 300))


def run_and_kill(directory: Path, round_: int, rng: random.Random
                 ) -> tuple[int | None, list[tuple[int, int, int]]]:
    """Run one writer and SIGKILL it at a random moment; return the last position it saw on
    open and every ``(first counter, first position, count)`` it acknowledged."""
    fsync = ("batch", "always")[round_ % 2]
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), str(round_), str(rng.randrange(1 << 30)),
         fsync, str(SEGMENT_BYTES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None
    lines: list[bytes] = []
    wait_for = rng.choice((-1, 0, 1, 2, 5, 10, 20, 50, 100))  # -1: kill it at once
    while len(lines) <= wait_for:
        line = child.stdout.readline()
        assert line, f"the writer died by itself: {child.stderr.read().decode()}"  # type: ignore[union-attr]
        lines.append(line)
    child.send_signal(signal.SIGKILL)
    # Lines already in the pipe were printed after their append returned: acknowledged too.
    rest, errors = child.communicate()
    assert child.returncode == -signal.SIGKILL, errors.decode()
    lines += rest.splitlines(keepends=True)
    if not lines:
        return None, []
    head, *acks = [line.split() for line in lines]
    assert head[0] == b"open", head
    complete = [ack for ack in acks if len(ack) == 3]  # the very last line may be cut off
    return int(head[1]), [(int(a), int(b), int(c)) for a, b, c in complete]


def power_cut(directory: Path, rng: random.Random, last_acknowledged: int) -> int:
    """Cut the last segment at a random point after ``last_acknowledged``; bytes cut."""
    first, path = segments(directory)[-1]
    keep = 0
    if last_acknowledged >= first:
        location = locate_record(directory, last_acknowledged)
        assert location is not None and location[0] == path.name
        offset = location[1]
        with open(path, "rb") as handle:
            handle.seek(offset)
            head = HEADER.unpack(handle.read(HEADER.size))
        keep = offset + HEADER.size + head[2] + head[5]
    size = path.stat().st_size
    cut = rng.randint(keep, size)
    os.truncate(path, cut)
    return size - cut


async def check(directory: Path, *, repair: bool,
                acknowledged: dict[int, AgentPaused]) -> list[Recorded]:
    """Open the log (for writing, which repairs the tail, or read-only) and check it."""
    result = verify_log(directory)
    assert result.ok, result
    log = await open_file_log(directory, readonly=not repair, segment_bytes=SEGMENT_BYTES)
    try:
        records = [record async for record in log.read()]
        if repair:
            assert log.repaired_bytes == result.torn_bytes
            assert verify_log(directory).torn_bytes == 0
    finally:
        await log.aclose()
    assert [r.position for r in records] == list(range(1, len(records) + 1))
    assert len(records) == result.records
    for position, expected in acknowledged.items():
        assert position <= len(records), f"acknowledged record {position} is lost"
        assert records[position - 1].event == expected, position
    # Beyond what was acknowledged: each round's records are its events 0, 1, 2, ... in
    # order, rounds follow one another, and nothing else is there.
    counters: dict[str, int] = {}
    rounds: list[str] = []
    for record in records:
        event_ = record.event
        assert isinstance(event_, AgentPaused)
        if not rounds or rounds[-1] != event_.by:
            assert event_.by not in counters, f"{event_.by} resumes at {record.position}"
            rounds.append(event_.by)
        counter = counters.get(event_.by, -1) + 1
        counters[event_.by] = counter
        assert event_ == event(int(event_.by.removeprefix("round-")), counter), record.position
    return records


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    acknowledged: dict[int, AgentPaused] = {}
    last = 0
    killed_mid_write = power_cuts = 0
    for round_ in range(ROUNDS):
        rng = random.Random(round_ * 7919 + 17)  # a fixed seed per round
        opened_at, acks = run_and_kill(directory, round_, rng)
        if opened_at is not None:
            assert opened_at == last  # the child saw exactly what the last check saw
            base = opened_at + 1
            for first_counter, first_position, count in acks:
                # Positions follow the order of the appends, and so do the counters.
                assert first_position == base + first_counter
                for i in range(count):
                    acknowledged[first_position + i] = event(round_, first_counter + i)
        if not directory.exists():
            continue
        killed_mid_write += verify_log(directory).torn_bytes > 0
        if round_ % 3 == 1:
            power_cuts += power_cut(directory, rng, max(acknowledged, default=0)) > 0
        # Every other round the parent repairs the tail; otherwise the next child does.
        records = asyncio.run(check(directory, repair=round_ % 2 == 0,
                                    acknowledged=acknowledged))
        last = len(records)
    assert last >= max(acknowledged)
    assert len(segments(directory)) > 3
    print(f"{ROUNDS} rounds, {last} records, {len(acknowledged)} acknowledged, "
          f"{killed_mid_write} kills left a torn tail, {power_cuts} power cuts")

"""``xml-pipeline replay`` and ``xml-pipeline tail`` on a local log directory."""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xml_pipeline.cli import main
from xml_pipeline.events import (
    AgentPaused,
    Event,
    HandlerFailed,
    HandlerSucceeded,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    MessageRejected,
    OrganismLoaded,
    OrganismStarted,
    Recorded,
    ThreadCompleted,
    TokensUsed,
)
from xml_pipeline.log.file import open_file_log
from xml_pipeline.log.file.segments import HEADER, HEADER_SIZE, locate_record
from xml_pipeline.state import project

SCRIPT = Path(sys.executable).parent / "xml-pipeline"


def scenario() -> list[Event]:
    """Three conversations between two listeners, with a failure, a pause and a rejection."""
    listeners = {"greeter": {"payload": "Greeting", "peers": ["shouter"]},
                 "shouter": {"payload": "Shout", "peers": []}}
    events: list[Event] = [
        OrganismLoaded(at=1.0, name="demo", digest="d1", source="name: demo\n",
                       budgets={"thread_tokens": 1000, "agent_tokens": None,
                                "organism_tokens": None}, listeners=listeners),
        OrganismStarted(at=2.0, name="demo", digest="d1", pid=42, host="box", version="0.1"),
    ]
    at = 10.0
    for t in range(3):
        thread, first, second = f"thread-{t}", f"m{t}-1", f"m{t}-2"
        at += 10
        events += [
            MessageAccepted(at=at, message_id=first, thread_id=thread, parent_id=None,
                            sender="api", to="greeter", payload_type="Greeting",
                            envelope=f"<message><Greeting><name>n{t}</name></Greeting></message>"),
            MessageDelivered(at=at + 1, message_id=first, listener="greeter", attempt=1),
            HandlerSucceeded(at=at + 2, message_id=first, listener="greeter", duration_ms=1.5),
            MessageAccepted(at=at + 2, message_id=second, thread_id=thread, parent_id=first,
                            sender="greeter", to="shouter", payload_type="Shout",
                            envelope="<message><Shout>HELLO</Shout></message>"),
            MessageDelivered(at=at + 3, message_id=second, listener="shouter", attempt=1),
            TokensUsed(at=at + 4, thread_id=thread, agent="shouter", model="model-x",
                       input_tokens=100 + t, output_tokens=20, cost=0.25),
        ]
        if t == 1:
            events += [
                HandlerFailed(at=at + 5, message_id=second, listener="shouter", attempt=1,
                              error="boom: the shouter fell over", will_retry=False),
                MessageDeadLettered(at=at + 6, message_id=second, listener="shouter",
                                    reason="failed"),
            ]
        else:
            events += [
                HandlerSucceeded(at=at + 5, message_id=second, listener="shouter",
                                 duration_ms=2.5),
                ThreadCompleted(at=at + 6, thread_id=thread),
            ]
    events += [
        AgentPaused(at=90.0, agent="shouter", by="ops", reason="too loud"),
        MessageRejected(at=91.0, reason="invalid_payload", error="Greeting lacks <name>.",
                        raw="<Greeting/>", sender="api", to="greeter"),
    ]
    return events


EVENTS = scenario()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A log holding ``EVENTS`` over several segment files."""
    directory = tmp_path / "events"

    async def write() -> None:
        async with await open_file_log(directory, segment_bytes=1700) as log:
            for start in range(0, len(EVENTS), 4):
                await log.append(EVENTS[start:start + 4])

    asyncio.run(write())
    return directory


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def data_offset(directory: Path, position: int) -> tuple[Path, int, int, int]:
    """``(segment, frame offset, frame end, data offset)`` of the record at ``position``."""
    location = locate_record(directory, position)
    assert location is not None
    path = directory / location[0]
    buf = path.read_bytes()
    head = HEADER.unpack_from(buf, location[1])
    start = location[1] + HEADER_SIZE + head[2]
    return path, location[1], start + head[5], start


# ------------------------------------------------------------------ replay --verify


def test_replay_verify_passes_on_an_intact_log(data: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    code, out, err = run(capsys, "replay", "--data", data, "--verify")
    assert (code, err) == (0, "")
    assert out.startswith(f"verified {len(EVENTS)} records: checksums and hash chain intact\n")


@pytest.mark.parametrize("position", [1, 9, len(EVENTS) // 2, len(EVENTS) - 1])
def test_one_edited_byte_makes_replay_verify_fail_naming_the_record(
        data: Path, capsys: pytest.CaptureFixture[str], position: int) -> None:
    path, _, end, start = data_offset(data, position)
    buf = bytearray(path.read_bytes())
    buf[(start + end) // 2] ^= 0x01
    path.write_bytes(bytes(buf))

    code, out, err = run(capsys, "replay", "--data", data, "--verify")
    assert code == 1
    assert f"damaged at position {position}:" in err
    assert f"{position - 1} records before it are intact" in err
    code, out, _ = run(capsys, "replay", "--data", data, "--verify", "--json")
    assert code == 1
    assert json.loads(out)["bad_position"] == position
    # Without --verify the checksum still stops the replay at that record.
    code, out, err = run(capsys, "replay", "--data", data)
    assert code == 1
    assert f"position {position}" in err


def test_an_edit_with_a_valid_checksum_is_caught_by_the_hash_chain(
        data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The HandlerFailed: "boom: the shouter fell over".
    position = next(n for n, e in enumerate(EVENTS, 1) if isinstance(e, HandlerFailed))
    path, frame, end, start = data_offset(data, position)
    buf = bytearray(path.read_bytes())
    at = buf.index(b"boom", start, end)
    buf[at:at + 4] = b"BOOM"  # still valid JSON, still a HandlerFailed
    buf[frame + 4:frame + 8] = struct.pack("<I", zlib.crc32(bytes(buf[frame + 8:end])))
    path.write_bytes(bytes(buf))

    code, _, err = run(capsys, "replay", "--data", data, "--verify")
    assert code == 1
    assert f"damaged at position {position}:" in err
    assert "hash chain broken" in err
    code, out, _ = run(capsys, "replay", "--data", data, "--verify", "--json")
    assert (code, json.loads(out)["bad_position"]) == (1, position)
    # The checksums alone do not notice: that is what the chain is for.
    code, out, err = run(capsys, "tail", "--data", data, "--json", "--type", "HandlerFailed")
    assert code == 0, err
    assert json.loads(out)["data"]["error"] == "BOOM: the shouter fell over"


# ------------------------------------------------------------------ replay


def test_replay_prints_the_digest_of_the_state_folded_in_process(
        data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = project(Recorded(n, e) for n, e in enumerate(EVENTS, start=1))
    code, out, _ = run(capsys, "replay", "--data", data, "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["digest"] == expected.digest()
    assert summary["position"] == len(EVENTS)
    assert summary["from_snapshot"] == 0
    assert summary["events"]["MessageAccepted"] == 6
    # Every accepted message counts, also those of threads that ended (whose per-message
    # records the state no longer keeps).
    assert summary["messages"] == 6
    assert summary["dead_letters"] == 1 and summary["rejected"] == 1
    assert summary["agents"] == {"greeter": "running", "shouter": "paused"}

    code, out, _ = run(capsys, "replay", "--data", data)
    assert code == 0
    assert f"  digest:   {expected.digest()}\n" in out
    assert "  messages: 6 accepted, 1 rejected, 1 dead letters\n" in out
    assert out.startswith(f"replayed {len(EVENTS)} events; state at position {len(EVENTS)}\n")

    # A snapshot gives the same state, and so does ignoring it.
    assert run(capsys, "replay", "--data", data, "--snapshot")[0] == 0
    for extra in ([], ["--no-snapshot"]):
        code, out, _ = run(capsys, "replay", "--data", data, "--json", *extra)
        summary = json.loads(out)
        assert summary["digest"] == expected.digest()
        assert summary["from_snapshot"] == (len(EVENTS) if not extra else 0)


# ------------------------------------------------------------------ tail


def tail_json(capsys: pytest.CaptureFixture[str], data: Path, *flags: str
              ) -> list[dict[str, Any]]:
    code, out, err = run(capsys, "tail", "--data", data, "--json", *flags)
    assert (code, err) == (0, "")
    return [json.loads(line) for line in out.splitlines()]


def expected_positions(keep: Callable[[int, Event], bool]) -> list[int]:
    return [n for n, e in enumerate(EVENTS, start=1) if keep(n, e)]


def thread_of(event: Event) -> str | None:
    threads = {e.message_id: e.thread_id for e in EVENTS if isinstance(e, MessageAccepted)}
    direct = getattr(event, "thread_id", None)
    if direct is not None:
        return str(direct)
    return threads.get(str(getattr(event, "message_id", "")))


def names(event: Event) -> set[str]:
    return {getattr(event, a) for a in ("listener", "agent", "sender", "to")
            if isinstance(getattr(event, a, None), str)}


def test_tail_json_prints_every_record(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = tail_json(capsys, data)
    assert [line["position"] for line in lines] == list(range(1, len(EVENTS) + 1))
    for line, event in zip(lines, EVENTS, strict=True):
        assert line["type"] == type(event).__name__
        assert line["data"]["at"] == event.at
    assert lines[2]["data"]["envelope"] == EVENTS[2].envelope  # type: ignore[attr-defined]


FILTERS = {
    "--type": (["--type", "MessageAccepted"],
               lambda n, e: isinstance(e, MessageAccepted)),
    "--type twice": (["--type", "HandlerFailed", "--type", "AgentPaused"],
                     lambda n, e: isinstance(e, HandlerFailed | AgentPaused)),
    "--thread": (["--thread", "thread-1"], lambda n, e: thread_of(e) == "thread-1"),
    "--agent": (["--agent", "shouter"], lambda n, e: "shouter" in names(e)),
    "--after": (["--after", "20"], lambda n, e: n > 20),
    "--after beyond the end": (["--after", "1000"], lambda n, e: False),
    "--thread --after": (["--thread", "thread-2", "--after", "23"],
                         lambda n, e: thread_of(e) == "thread-2" and n > 23),
    "--agent --type": (["--agent", "greeter", "--type", "MessageDelivered"],
                       lambda n, e: isinstance(e, MessageDelivered) and "greeter" in names(e)),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_tail_json_filters(data: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    flags, keep = FILTERS[name]
    expected = expected_positions(keep)
    assert name == "--after beyond the end" or expected  # the filter selects something
    assert [line["position"] for line in tail_json(capsys, data, *flags)] == expected


def test_tail_thread_filter_includes_events_known_only_by_message(
        data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    types = [line["type"] for line in tail_json(capsys, data, "--thread", "thread-0")]
    assert types == ["MessageAccepted", "MessageDelivered", "HandlerSucceeded",
                     "MessageAccepted", "MessageDelivered", "TokensUsed", "HandlerSucceeded",
                     "ThreadCompleted"]


def test_tail_refuses_an_unknown_type(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "tail", "--data", data, "--type", "MessageEaten")
    assert (code, out) == (2, "")
    assert err.startswith("Unknown event type(s): MessageEaten. Known: AgentPaused, ")


async def test_tail_follow_shows_records_appended_later(tmp_path: Path) -> None:
    directory = tmp_path / "events"
    async with await open_file_log(directory, segment_bytes=1700) as log:
        await log.append(EVENTS[:5])
        child = await asyncio.create_subprocess_exec(
            SCRIPT, "tail", "--data", str(directory), "-f", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert child.stdout is not None
        try:
            async with asyncio.timeout(60):
                for position in range(1, 6):
                    line = json.loads(await child.stdout.readline())
                    assert line["position"] == position
                for start in range(5, len(EVENTS), 3):
                    await log.append(EVENTS[start:start + 3])
                for position in range(6, len(EVENTS) + 1):
                    line = json.loads(await child.stdout.readline())
                    assert (line["position"], line["type"]) == (
                        position, type(EVENTS[position - 1]).__name__)
        finally:
            child.kill()
            await child.wait()


async def test_tail_follow_with_a_filter_on_an_empty_directory(tmp_path: Path) -> None:
    directory = tmp_path / "not-yet"
    child = await asyncio.create_subprocess_exec(
        SCRIPT, "tail", "--data", str(directory), "-f", "--json", "--agent", "shouter",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    try:
        async with asyncio.timeout(60):
            # tail -f creates the directory and waits for the log to begin.
            async with await open_file_log(directory) as log:
                await log.append(EVENTS)
            expected = expected_positions(lambda n, e: "shouter" in names(e))
            for position in expected:
                assert json.loads(await child.stdout.readline())["position"] == position
    finally:
        child.kill()
        await child.wait()

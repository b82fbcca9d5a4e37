"""Fuzzing the stored form of events: the record decoder and the file log's reader and repair.

``events.decode`` gets random type names, versions and bytes, random JSON, and the JSON of real
events with fields removed, mistyped, added, huge or NaN: it returns the event or raises
``RecordDecodeError``, nothing else. ``events.encode`` gets events with random field values:
what it encodes decodes back to an equal event, and what could not (NaN, lone surrogates) it
refuses with ``ValueError`` before anything is written.

A real log of a few hundred events (every type, three segments) is damaged at random (bytes
flipped, inserted, deleted, zeroed, files cut short) and then: ``verify_log`` reports and never
raises; a read-only reader yields the original records in order and then ends or raises
``LogCorruptedError``/``RecordDecodeError``, never a wrong record; a writable open cuts a torn
tail (and then appends and verifies cleanly) or raises ``LogCorruptedError`` naming the
position, leaving the files as they were.

The fuzzers are seeded (``derandomize``) and bounded; the nastiest inputs they found are kept at
the end as plain regression tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xml_pipeline.errors import LogCorruptedError, RecordDecodeError
from xml_pipeline.events import (
    CATALOGUE,
    AgentPaused,
    AgentResumed,
    BudgetExhausted,
    BudgetRaised,
    BudgetWarned,
    Event,
    HandlerFailed,
    HandlerSucceeded,
    LogRepaired,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    MessageDropped,
    MessageRejected,
    MessageRetried,
    ModelResponded,
    OrganismLoaded,
    OrganismReloaded,
    OrganismStarted,
    OrganismStopped,
    Recorded,
    ReloadRejected,
    ThreadCompleted,
    ThreadKilled,
    TokensReserved,
    TokensUsed,
    UsageReset,
    decode,
    encode,
)
from xml_pipeline.log.file import open_file_log, verify_log
from xml_pipeline.log.file.segments import HEADER, HEADER_SIZE, make_frame, segments

SETTINGS = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                    max_examples=300,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: How many records the damaged log holds, and the segment size that splits it in three.
RECORDS = 240
SEGMENT_BYTES = 24 * 1024


# ------------------------------------------------------------------ real events


def real_event(n: int) -> Event:
    """Event number ``n``: every type of the catalogue in turn, with values that vary."""
    s, at = f"x{n}", 1_700_000_000.0 + n / 8
    listeners = {s: {"peers": [s, "b"], "timeout": 30.0, "agent": None, "budget": {"n": n}}}
    made: list[Event] = [
        OrganismStarted(at=at, name=s, digest="d" * 64, pid=n, host="h", version="1.0"),
        OrganismLoaded(at=at, name=s, digest="d", source="organism: {name: o}\n",
                       budgets={"thread_tokens": n, "agent_tokens": None}, listeners=listeners),
        OrganismReloaded(at=at, name=s, digest="e", source="listeners: []\n", budgets={},
                         listeners=listeners, added=(s,), removed=(), updated=("b",),
                         changes={"b": ["peers", "handler_code"]}),
        ReloadRejected(at=at, error=f"organism.yaml:{n}: bad"),
        OrganismStopped(at=at, reason="signal"),
        MessageAccepted(at=at, message_id=f"m{n}", thread_id="t", parent_id=None, sender="api",
                        to="greeter", payload_type="Greeting",
                        envelope=f"<message>é€😀 {n}</message>",
                        idempotency_key=s if n % 2 else None),
        MessageRejected(at=at, reason="invalid_payload", error="No.", raw="<x>\x01</x>" * n,
                        sender=None, to="b", thread_id=None),
        MessageDelivered(at=at, message_id=f"m{n}", listener="b", attempt=n,
                         redelivery=bool(n % 2)),
        HandlerSucceeded(at=at, message_id=f"m{n}", listener="b", duration_ms=n * 0.25),
        HandlerFailed(at=at, message_id=f"m{n}", listener="b", attempt=2, error="boom",
                      will_retry=True),
        MessageRetried(at=at, message_id=f"m{n}", listener="b", attempt=3, delay=0.1 * n),
        MessageDeadLettered(at=at, message_id=f"m{n}", listener="b", reason="retries"),
        MessageDropped(at=at, message_id=f"m{n}", thread_id="t", reason="killed"),
        AgentPaused(at=at, agent="b", by="cli", reason="r" * (n % 37)),
        AgentResumed(at=at, agent="b", by="api"),
        ThreadKilled(at=at, thread_id="t", by="api"),
        ThreadCompleted(at=at, thread_id="t"),
        TokensReserved(at=at, reservation_id=s, thread_id="t", agent="b", model="m",
                       tokens=n * 1000),
        TokensUsed(at=at, thread_id="t", agent="b", model="m", input_tokens=n,
                   output_tokens=2 * n, cost=n / 1e6, reservation_id=s),
        ModelResponded(at=at, key=f"m{n}#0", message_id=f"m{n}", thread_id="t", agent="b",
                       model="m", text="<answer/>" * (n % 5), stop_reason="end_turn"),
        BudgetExhausted(at=at, scope="thread", key="t", thread_id="t", agent="b", limit=10,
                        used=9, requested=n),
        BudgetWarned(at=at, scope="agent", key="b", percent=90, used=9, limit=10),
        BudgetRaised(at=at, scope="organism", key="o", max_tokens=n, by="cli"),
        UsageReset(at=at, by="cli"),
        LogRepaired(at=at, cut_at=n, folder=f"damaged-{n}", moved=(s,), problems=("bad",)),
    ]
    assert {type(e) for e in made} == set(CATALOGUE.values())
    return made[n % len(made)]


SAMPLES = [real_event(n) for n in range(len(CATALOGUE))]


def test_the_samples_cover_the_catalogue() -> None:
    assert sorted(type(e).__name__ for e in SAMPLES) == sorted(CATALOGUE)
    for event in SAMPLES:
        assert decode(*encode(event)) == event


# ------------------------------------------------------------------ the decoder


def check_decode(type_name: bytes | str, version: int, data: bytes) -> Event | None:
    """Decode, allowing only ``RecordDecodeError``; a decoded event survives a round trip."""
    try:
        event = decode(type_name, version, data)
    except RecordDecodeError as exc:
        assert exc.message.endswith(".") and exc.message[0].isupper(), exc.message
        return None
    name = type_name.decode("ascii") if isinstance(type_name, bytes) else type_name
    assert type(event) is CATALOGUE[name]
    assert decode(*encode(event)) == event
    return event


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
type_names = st.sampled_from(sorted(CATALOGUE)) | st.text(max_size=30) | st.binary(max_size=30)
versions = st.sampled_from([1, 1, 1, 0, -1, 2]) | st.integers()


@SETTINGS
@given(type_names, versions, st.binary(max_size=200))
def test_random_bytes_decode_or_are_refused(type_name: str | bytes, version: int,
                                            data: bytes) -> None:
    check_decode(type_name, version, data)


@SETTINGS
@given(st.sampled_from(sorted(CATALOGUE)), versions, json_values)
def test_random_json_decodes_or_is_refused(name: str, version: int, value: Any) -> None:
    check_decode(name, version, json.dumps(value).encode())


def _mutations(data: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    keys = sorted(data)
    removed = st.sets(st.sampled_from(keys), min_size=1).map(
        lambda gone: {k: v for k, v in data.items() if k not in gone})
    mistyped = st.dictionaries(st.sampled_from(keys), json_values | st.sampled_from(
        [10**40, -(10**40), 1e308, -1e308, 5e-324, True, "", "NaN", [], {}]), min_size=1
    ).map(lambda changed: {**data, **changed})
    extra = st.dictionaries(st.text(max_size=10), json_values, min_size=1).map(
        lambda more: {**more, **data})
    return removed | mistyped | extra


@SETTINGS
@given(st.data())
def test_real_events_with_fields_removed_mistyped_or_added(data: st.DataObject) -> None:
    event = data.draw(st.sampled_from(SAMPLES))
    name, version, raw = encode(event)
    changed = data.draw(_mutations(json.loads(raw)))
    decoded = check_decode(name, version, json.dumps(changed).encode())
    if decoded is not None and set(changed) == set(json.loads(raw)):
        # Only values changed: the event holds what the JSON holds.
        assert same(json.loads(encode(decoded)[2]), changed)


def same(stored: Any, given: Any) -> bool:
    """Equal JSON values, where an integer given for a float field comes back as a float."""
    if isinstance(stored, float) and isinstance(given, int) and not isinstance(given, bool):
        return stored == float(given)
    if isinstance(stored, dict) and isinstance(given, dict):
        return stored.keys() == given.keys() and all(same(stored[k], given[k]) for k in stored)
    if isinstance(stored, list) and isinstance(given, list):
        return len(stored) == len(given) and all(map(same, stored, given))
    return type(stored) is type(given) and stored == given


@SETTINGS
@given(st.data())
def test_real_events_with_their_bytes_changed(data: st.DataObject) -> None:
    name, version, raw = encode(data.draw(st.sampled_from(SAMPLES)))
    where = data.draw(st.integers(0, len(raw)))
    cut = data.draw(st.integers(0, 8))
    insert = data.draw(st.sampled_from([b"", b"NaN", b"Infinity", b"-", b"1e999", b"\\ud800",
                                        b"\xff", b"\x00", b"[" * 3000, b'"', b"9" * 5000])
                       | st.binary(max_size=6))
    check_decode(name, version, raw[:where] + insert + raw[where + cut:])


# ------------------------------------------------------------------ the encoder


def _field_values(type_text: str) -> st.SearchStrategy[Any]:
    text = st.text(max_size=30)
    floats = st.floats()  # NaN and infinities included: encode must refuse them
    by_type: dict[str, st.SearchStrategy[Any]] = {
        "str": text,
        "str | None": st.none() | text,
        "int": st.integers(),
        "float": floats,
        "float | None": st.none() | floats,
        "bool": st.booleans(),
        "tuple[str, ...]": st.lists(text, max_size=3).map(tuple),
        "dict[str, int | None]": st.dictionaries(text, st.none() | st.integers(), max_size=3),
        "dict[str, int]": st.dictionaries(text, st.integers(), max_size=3),
        "dict[str, list[str]]": st.dictionaries(text, st.lists(text, max_size=3), max_size=3),
        "dict[str, dict[str, Any]]": st.dictionaries(
            text, st.dictionaries(text, json_values, max_size=3), max_size=3),
    }
    return by_type[type_text]


def _events_of(cls: type[Event]) -> st.SearchStrategy[Event]:
    return st.fixed_dictionaries({f.name: _field_values(str(f.type)) for f in fields(cls)}
                                 ).map(lambda kwargs: cls(**kwargs))


any_event = st.sampled_from(sorted(CATALOGUE.values(), key=lambda c: c.__name__)).flatmap(
    _events_of)


@SETTINGS
@given(any_event)
def test_what_encode_writes_decodes_to_the_same_event(event: Event) -> None:
    try:
        name, version, data = encode(event)
    except ValueError as exc:
        values = [getattr(event, f.name) for f in fields(event)]
        assert any(isinstance(v, float) and not math.isfinite(v) for v in values), exc
        assert str(exc).endswith(".")
        return
    assert decode(name, version, data) == event


def test_encode_refuses_what_could_not_be_read_back() -> None:
    with pytest.raises(ValueError, match=r"^AgentPaused.at is nan, which JSON cannot hold"):
        encode(AgentPaused(at=math.nan, agent="a", by="b"))
    with pytest.raises(ValueError, match=r"^MessageRetried.delay is inf, "):
        encode(MessageRetried(at=1.0, message_id="m", listener="b", attempt=2, delay=math.inf))
    with pytest.raises(ValueError, match=r"^AgentPaused holds text with a lone surrogate "
                                         r"\('\\ud800'\)"):
        encode(AgentPaused(at=1.0, agent="\ud800", by="b"))


# ------------------------------------------------------------------ the damaged log


ORIGINAL = [Recorded(n, real_event(n)) for n in range(1, RECORDS + 1)]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("template")

    async def write() -> None:
        async with await open_file_log(directory, segment_bytes=SEGMENT_BYTES) as log:
            for first in range(0, RECORDS, 7):
                await log.append([r.event for r in ORIGINAL[first:first + 7]])

    asyncio.run(write())
    assert len(segments(directory)) == 3
    assert verify_log(directory).records == RECORDS
    return directory


def disk(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "LOCK"}


def damage(directory: Path, ops: list[tuple[str, int, int, bytes]]) -> set[str]:
    """Apply ``(kind, segment, offset, data)`` operations; answer the segments changed."""
    listing = segments(directory)
    changed = set()
    for kind, index, at, data in ops:
        path = listing[index % len(listing)][1]
        buf = bytearray(path.read_bytes())
        at %= len(buf) + 1
        if kind == "flip":
            if at == len(buf):
                continue
            buf[at] ^= data[0] or 1
        elif kind == "insert":
            buf[at:at] = data
        elif kind == "delete":
            del buf[at:at + len(data)]
        elif kind == "zero":
            buf[at:at + len(data)] = bytes(len(buf[at:at + len(data)]))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "duplicate":  # the bytes at ``at`` repeated: a frame may appear twice
            buf[at:at] = buf[at:at + len(data) * 16]
        path.write_bytes(bytes(buf))
        changed.add(path.name)
    return changed


async def read_prefix(directory: Path, *, readonly: bool
                      ) -> tuple[list[Recorded], Exception | None]:
    """Every record a fresh log yields, and the error that stopped it (if any)."""
    records: list[Recorded] = []
    try:
        log = await open_file_log(directory, readonly=readonly)
    except LogCorruptedError as exc:  # the open checks the log first
        return records, exc
    # A reader's idea of the last position comes from checked frames, never from damage.
    assert 0 <= log.last_position <= RECORDS + 1  # (+1: the record a repair test appends)
    try:
        async for record in log.read():
            records.append(record)
    except (LogCorruptedError, RecordDecodeError) as exc:
        return records, exc
    finally:
        await log.aclose()
    return records, None


def holds_no_record(content: bytes) -> bool:
    """True if ``content`` does not start with a whole frame with a valid checksum."""
    if len(content) < HEADER_SIZE:
        return True
    magic, _, type_len, crc, _, data_len, *_ = HEADER.unpack_from(content)
    end = HEADER_SIZE + type_len + data_len
    return magic != b"XP" or end > len(content) or zlib.crc32(content[8:end]) != crc


def assert_prefix(records: list[Recorded]) -> None:
    assert records == ORIGINAL[:len(records)]


async def check_damaged_log(directory: Path, changed: set[str]) -> None:
    before = disk(directory)
    last_segment = segments(directory)[-1][1].name
    result = verify_log(directory)
    assert 0 <= result.records <= RECORDS + 16
    if result.ok:
        assert result.problem is None
    else:
        assert result.bad_position == result.last_position + 1 and result.problem

    records, error = await read_prefix(directory, readonly=True)
    assert_prefix(records)
    if result.ok:  # a whole hash chain: the reader sees exactly what the verifier saw
        assert error is None and len(records) == result.records
    if isinstance(error, LogCorruptedError):
        assert f"position {error.position}" in error.message
    assert disk(directory) == before  # reading changes nothing

    try:
        log = await open_file_log(directory, segment_bytes=SEGMENT_BYTES)
    except LogCorruptedError as exc:
        assert f"position {exc.position}" in exc.message
        # A refused open changes nothing, except that it may first have removed last segments
        # that held no good record (empty, or a torn or damaged first frame) before finding
        # the damage in the segment before them (see the report on file.py's _recover_tail).
        after = disk(directory)
        assert after == {name: before[name] for name in after}
        assert all(holds_no_record(before[name]) for name in set(before) - set(after))
        return
    after = disk(directory)
    for name, content in after.items():  # a repair only cuts bytes off the end
        assert before[name][:len(content)] == content
    try:
        last = log.last_position
        new = AgentResumed(at=2e9, agent="after", by="repair")
        assert await log.append([new]) == [last + 1]
        after = max(last - 3, 0)
        records = []
        try:
            async for record in log.read(after=after):
                records.append(record)
        except LogCorruptedError:
            # Only the last segment is checked on open; damage before it is found by reads.
            assert not changed <= {last_segment}
        else:
            assert records == ORIGINAL[after:last] + [Recorded(last + 1, new)]
        assert records == (ORIGINAL[after:last] + [Recorded(last + 1, new)])[:len(records)]
    finally:
        await log.aclose()
    if changed <= {last_segment}:
        # Only the last segment was damaged, and its tail was cut: the log is whole again.
        result = verify_log(directory)
        assert (result.ok, result.records, result.torn_bytes) == (True, last + 1, 0)
        records, error = await read_prefix(directory, readonly=True)
        assert error is None and records[:-1] == ORIGINAL[:last]


@pytest.fixture(scope="module")
def copies(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("damaged")

    def copy() -> Path:
        directory = Path(tempfile.mkdtemp(dir=root))
        shutil.rmtree(directory)
        shutil.copytree(template, directory, ignore=shutil.ignore_patterns("LOCK"))
        return directory

    yield copy
    shutil.rmtree(root, ignore_errors=True)


operation = st.tuples(
    st.sampled_from(["flip", "flip", "insert", "delete", "zero", "truncate", "duplicate"]),
    st.sampled_from([-1, -1, 0, 1]),  # mostly the last segment, where repair happens
    st.integers(0, SEGMENT_BYTES + 2048),
    st.binary(min_size=1, max_size=48),
)


@settings(SETTINGS, max_examples=250)
@given(ops=st.lists(operation, min_size=1, max_size=3))
def test_a_damaged_log_is_reported_read_as_a_prefix_and_repaired_or_refused(
        copies: Any, ops: list[tuple[str, int, int, bytes]]) -> None:
    directory = copies()
    try:
        changed = damage(directory, ops)
        asyncio.run(check_damaged_log(directory, changed))
    finally:
        shutil.rmtree(directory)


# ------------------------------------------------------------------ the corpus

#: Damage the fuzzer found worth keeping, as (segment, offset, data) operations.
CORPUS: dict[str, list[tuple[str, int, int, bytes]]] = {
    "the last byte of the log flipped": [("flip", -1, -1, b"\x01")],
    "the first byte of the last segment flipped": [("flip", -1, 0, b"\x01")],
    "the log cut one byte into the last segment": [("truncate", -1, 1, b"\x00")],
    "the last segment emptied": [("truncate", -1, 0, b"\x00")],
    "the first segment emptied": [("truncate", 0, 0, b"\x00")],
    "the middle segment cut short": [("truncate", 1, 5000, b"\x00")],
    "a frame's length zeroed in the first segment": [("zero", 0, 10, b"\x00" * 4)],
    "a frame's data length set huge": [("insert", -1, 10, b"\xff\xff\xff\x7f")],
    "a header's worth of zeros in the middle": [("zero", -1, 3000, bytes(HEADER_SIZE))],
    "the start of a frame repeated": [("duplicate", -1, 0, bytes(4))],
    "one byte deleted at the start": [("delete", -1, 0, b"\x00")],
    "zeros appended": [("insert", -1, -1, bytes(300))],
    "a magic and a format appended": [("insert", -1, -1, b"XP\x01")],
    # Found by the fuzzer: the open removes the empty last segment, then refuses the damage in
    # the one before it.
    "the middle segment's first byte flipped and the last emptied": [
        ("flip", 1, 0, b"\x01"), ("truncate", -1, 0, b"\x00")],
    # Found by the fuzzer: the open repairs the last segment, then a read from near the end
    # starts in the damaged middle segment.
    "the middle segment's first byte flipped and the last cut short": [
        ("flip", 1, 0, b"\x01"), ("truncate", -1, 160, b"\x00")],
    # Found by the fuzzer: a position zeroed, so the reader's cheap skip passes the frame and
    # the next one is out of place (the message named a different position than the error).
    "the first position of the last segment zeroed": [("zero", -1, 13, b"\x00\x00")],
}


@pytest.mark.parametrize("case", sorted(CORPUS))
async def test_corpus_of_damaged_logs(case: str, copies: Any) -> None:
    directory = copies()
    changed = damage(directory, CORPUS[case])
    await check_damaged_log(directory, changed)


async def test_a_reader_takes_the_last_position_from_a_good_frame(copies: Any) -> None:
    # Found by the fuzzer: a read-only opener took the last position from the last header,
    # unchecked, so a damaged one reported a position like 9044649725937582305.
    directory = copies()
    last = segments(directory)[-1][1]
    content = bytearray(last.read_bytes())
    offset = 0
    while True:
        head = HEADER.unpack_from(content, offset)
        length = HEADER_SIZE + head[2] + head[5]
        if offset + length == len(content):
            break
        offset += length
    content[offset + 21] ^= 0x7D  # the top byte of the last record's position
    last.write_bytes(bytes(content))
    # That whole frame fails its checksum: damage, which the open names (never a torn tail).
    with pytest.raises(LogCorruptedError) as caught:
        await open_file_log(directory, readonly=True)
    assert caught.value.position == RECORDS
    assert f"({last.name}, offset {offset}: checksum mismatch" in caught.value.message


def _frame(position: int, type_name: bytes, version: int, data: bytes) -> bytes:
    return make_frame(position=position, at=1.0, type_name=type_name, version=version,
                      data=data, previous=bytes(16))[0]


#: Frames with a valid checksum whose content does not decode: the reader names the record.
UNDECODABLE = {
    "an unknown type": (b"MessageEaten", 1, b"{}", "Unknown event type 'MessageEaten'"),
    "a future version": (b"AgentPaused", 9, b"{}", "AgentPaused version 9 is not known"),
    "version zero": (b"AgentPaused", 0, b"{}", "AgentPaused version 0 cannot be"),
    "not JSON": (b"AgentPaused", 1, b"\xff{", "The AgentPaused data is not JSON"),
    "NaN": (b"AgentPaused", 1, b'{"at":NaN,"agent":"a","by":"b"}',
            "The AgentPaused data is not JSON"),
    "a huge number": (b"AgentPaused", 1, b'{"at":1e999,"agent":"a","by":"b"}',
                      "The AgentPaused data does not fit the event (Number out of range"),
    "a missing field": (b"AgentPaused", 1, b'{"at":1.0,"by":"b"}',
                        "The AgentPaused data does not fit the event (Object missing required "
                        "field `agent`)"),
    "deep nesting": (b"OrganismLoaded", 1, b'{"at":1,"name":"n","digest":"d","source":"",'
                     b'"budgets":{},"listeners":{"a":{"b":' + b"[" * 100_000 + b"]" * 100_000
                     + b"}}}", "The OrganismLoaded data is nested too deeply to decode"),
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
async def test_a_whole_frame_that_does_not_decode_is_named_by_position(
        case: str, copies: Any) -> None:
    type_name, version, data, reason = UNDECODABLE[case]
    directory = copies()
    last = segments(directory)[-1][1]
    content = last.read_bytes()
    # Replace the last record by a frame with a valid checksum but undecodable content.
    offset, length = 0, 0
    while offset + length < len(content):
        offset += length
        head = HEADER.unpack_from(content, offset)
        length = HEADER_SIZE + head[2] + head[5]
    last.write_bytes(content[:offset] + _frame(RECORDS, type_name, version, data))
    assert zlib.crc32(last.read_bytes()[offset + 8:]) == HEADER.unpack_from(
        last.read_bytes(), offset)[3]
    records, error = await read_prefix(directory, readonly=True)
    assert records == ORIGINAL[:RECORDS - 1]
    assert isinstance(error, RecordDecodeError)
    assert error.message.startswith(f"The record at position {RECORDS} ({last.name}, offset "
                                    f"{offset}) cannot be read: {reason}")
    # The verifier checks frames and the chain, not content: this frame breaks the chain.
    assert verify_log(directory).bad_position == RECORDS


CORPUS_RECORDS = {
    "type name of invalid ASCII": (b"\xffAgentPaused", 1, b"{}"),
    "an empty type name": (b"", 1, b"{}"),
    "the base class": ("Event", 1, b'{"at":1}'),
    "a dunder": ("__class__", 1, b"{}"),
    "a huge version": ("AgentPaused", 2**70, b"{}"),
    "a lone surrogate escape": ("AgentPaused", 1, b'{"at":1,"agent":"\\ud800","by":"b"}'),
    "a 5000-digit integer": ("AgentPaused", 1, b'{"at":' + b"9" * 5000 + b',"agent":"a",'
                                                b'"by":"b"}'),
    "a 5000-digit integer in a free-form field": (
        "OrganismLoaded", 1, b'{"at":1,"name":"n","digest":"d","source":"","budgets":{},'
                             b'"listeners":{"a":{"x":' + b"9" * 5000 + b"}}}"),
    "a boolean for a number": ("AgentPaused", 1, b'{"at":true,"agent":"a","by":"b"}'),
    "null for a number": ("AgentPaused", 1, b'{"at":null,"agent":"a","by":"b"}'),
    "a byte order mark": ("AgentPaused", 1, b'\xef\xbb\xbf{"at":1,"agent":"a","by":"b"}'),
    "invalid UTF-8 inside a string": ("AgentPaused", 1, b'{"at":1,"agent":"\xff","by":"b"}'),
    "trailing garbage": ("AgentPaused", 1, b'{"at":1,"agent":"a","by":"b"}x'),
    "an array for the event": ("AgentPaused", 1, b"[1, 2]"),
}


@pytest.mark.parametrize("case", sorted(CORPUS_RECORDS))
def test_corpus_of_records(case: str) -> None:
    type_name, version, data = CORPUS_RECORDS[case]
    assert check_decode(type_name, version, data) is None

"""The pump end to end, on a real file log: threads, causality, identity, peers, pause,
kill, retries, dead letters, backpressure, and live state equal to replayed state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests import handlers
from tests.conftest import write_organism
from xml_pipeline.config import load_organism
from xml_pipeline.envelope import ENVELOPE_NS
from xml_pipeline.errors import (
    EnvelopeError,
    MailboxFullError,
    PayloadError,
    ThreadClosedError,
    UnknownListenerError,
)
from xml_pipeline.events import (
    HandlerFailed,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    MessageDropped,
    MessageRejected,
    ThreadKilled,
)
from xml_pipeline.log.file import FileLog, open_file_log
from xml_pipeline.runtime import delivery
from xml_pipeline.runtime.pump import Pump, open_pump
from xml_pipeline.state import replay

ITEM_XSD = """<?xml version="1.0"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Item">
    <xs:complexType><xs:sequence>
      <xs:element name="n" type="xs:string"/>
    </xs:sequence></xs:complexType>
  </xs:element>
</xs:schema>
"""

ORGANISM = """
organism: {name: pump-test}
listeners:
  - {name: first, description: d, payload: schemas/item.xsd, handler: "tests.handlers:first",
     peers: [second]}
  - {name: second, description: d, payload: schemas/item.xsd, handler: "tests.handlers:second",
     peers: [third]}
  - {name: third, description: d, payload: schemas/item.xsd, handler: "tests.handlers:third"}
  - {name: caller, description: d, payload: schemas/item.xsd, handler: "tests.handlers:caller",
     peers: [echo], concurrency: 4}
  - {name: echo, description: d, payload: schemas/item.xsd, handler: "tests.handlers:echo",
     concurrency: 4}
  - {name: forger, description: d, payload: schemas/item.xsd, handler: "tests.handlers:forger",
     peers: [third]}
  - {name: trespasser, description: d, payload: schemas/item.xsd,
     handler: "tests.handlers:trespasser", peers: [second]}
  - {name: stubborn, description: d, payload: schemas/item.xsd,
     handler: "tests.handlers:stubborn", peers: [second]}
  - {name: slow, description: d, payload: schemas/item.xsd, handler: "tests.handlers:slow",
     peers: [third]}
  - {name: failing, description: d, payload: schemas/item.xsd,
     handler: "tests.handlers:failing", retries: {max: 2, backoff: 10ms}}
  - {name: sleepy, description: d, payload: schemas/item.xsd, handler: "tests.handlers:sleepy",
     timeout: 50ms}
  - {name: flaky, description: d, payload: schemas/item.xsd, handler: "tests.handlers:flaky",
     retries: {max: 1, backoff: 1ms}}
"""


def item(n: object) -> str:
    return f"<Item><n>{n}</n></Item>"


@pytest.fixture
def organism_path(tmp_path: Path) -> Path:
    handlers.reset()
    return write_organism(tmp_path / "org", ORGANISM, schemas={"item.xsd": ITEM_XSD})


@pytest.fixture
async def pump(organism_path: Path, log: FileLog) -> AsyncIterator[Pump]:
    async with open_pump(load_organism(organism_path), log, mailbox_capacity=200) as pump:
        yield pump


async def events_of(log: FileLog, kind: type[Any]) -> list[Any]:
    return [r.event async for r in log.read() if isinstance(r.event, kind)]


async def assert_live_equals_replay(pump: Pump, log: FileLog) -> None:
    await pump.wait_idle()
    replayed = await replay(log)
    assert replayed.position == pump.state.position
    assert replayed == pump.state
    assert replayed.digest() == pump.state.digest()


async def test_three_hops_keep_one_thread_and_a_causal_tree(pump: Pump, log: FileLog) -> None:
    accepted = await pump.inject(item(7), to="first")
    await pump.wait_idle()
    assert [s["listener"] for s in handlers.seen] == ["first", "second", "third"]
    assert {s["thread"] for s in handlers.seen} == {accepted.thread_id}
    assert [s["sender"] for s in handlers.seen] == ["api", "first", "second"]
    ids = [s["message_id"] for s in handlers.seen]
    assert [s["parent"] for s in handlers.seen] == [None, ids[0], ids[1]]
    assert [(s["n"], s["namespace"]) for s in handlers.seen] == [("7", None)] * 3
    thread = pump.state.threads.threads[accepted.thread_id]
    assert (thread.status, thread.message_count, thread.open_count) == ("completed", 3, 0)
    # The ended thread keeps its history as log positions; the log holds the causal tree.
    assert pump.state.threads.messages == {}
    records = {r.position: r.event async for r in log.read()}
    tree = [records[p] for p in thread.positions]
    assert [(m.message_id, m.sender, m.to, m.parent_id) for m in tree] == [
        (ids[0], "api", "first", None), (ids[1], "first", "second", ids[0]),
        (ids[2], "second", "third", ids[1])]
    await assert_live_equals_replay(pump, log)


async def test_hundred_concurrent_conversations_keep_their_threads(pump: Pump, log: FileLog
                                                                   ) -> None:
    accepted = await asyncio.gather(*(pump.inject(item(k), to="caller") for k in range(100)))
    await pump.wait_idle()
    assert len({a.thread_id for a in accepted}) == 100
    thread_of = {a.thread_id: k for k, a in enumerate(accepted)}
    replies = [s for s in handlers.seen if s["listener"] == "caller" and s["sender"] == "echo"]
    assert len(replies) == 100
    for reply in replies:
        assert reply["n"] == str(thread_of[reply["thread"]])
    assert all(t.status == "completed" for t in pump.state.threads.threads.values())
    await assert_live_equals_replay(pump, log)


async def test_a_forged_sender_thread_and_id_have_no_effect(pump: Pump, log: FileLog) -> None:
    accepted = await pump.inject(item(1), to="forger")
    await pump.wait_idle()
    delivered = [s for s in handlers.seen if s["listener"] == "third"]
    assert len(delivered) == 1
    assert delivered[0]["sender"] == "forger"
    assert delivered[0]["thread"] == accepted.thread_id
    assert delivered[0]["message_id"] != "FORGED"
    assert "stolen-thread" not in pump.state.threads.threads
    sent = [e for e in await events_of(log, MessageAccepted) if e.to == "third"]
    assert (sent[0].sender, sent[0].thread_id) == ("forger", accepted.thread_id)
    assert "<from>forger</from>" in sent[0].envelope and "admin" not in sent[0].envelope


async def test_undeclared_peer_and_invalid_reply_come_back_as_system_errors(
        pump: Pump, log: FileLog) -> None:
    accepted = await pump.inject(item(1), to="trespasser")
    await pump.wait_idle()
    rejected = await events_of(log, MessageRejected)
    assert [(r.reason, r.sender, r.to, r.thread_id) for r in rejected] == [
        ("undeclared_peer", "trespasser", "third", accepted.thread_id),
        ("invalid_payload", "trespasser", "second", accepted.thread_id),
    ]
    assert rejected[0].error == (
        "Listener 'trespasser' may not send to 'third': its peers in organism.yaml (line 15) "
        "are: second. Send to a declared peer, or add 'third' to its peers.")
    assert rejected[1].raw == "<Item><wrong/></Item>"
    errors = [s for s in handlers.seen if s["listener"] == "trespasser" and s["sender"] == "system"]
    assert [e["tag"] for e in errors] == ["SystemError", "SystemError"]
    assert "<code>undeclared_peer</code>" in errors[0]["text"]
    assert "<code>invalid_payload</code>" in errors[1]["text"]
    assert not [s for s in handlers.seen if s["listener"] in ("second", "third")]
    await assert_live_equals_replay(pump, log)


async def test_system_errors_stop_after_a_few_rounds(pump: Pump, log: FileLog) -> None:
    await pump.inject(item(1), to="stubborn")
    await pump.wait_idle()
    system = [s for s in handlers.seen if s["sender"] == "system"]
    assert len(system) == 3
    assert len(await events_of(log, MessageRejected)) == 4


async def test_pause_holds_messages_and_resume_delivers_them_in_order(pump: Pump, log: FileLog
                                                                      ) -> None:
    await pump.pause("third", by="test")
    accepted = [await pump.inject(item(k), to="third") for k in range(10)]
    await pump.wait_idle()
    assert handlers.seen == []
    assert await events_of(log, MessageDelivered) == []
    assert pump.state.agents.agents["third"].status == "paused"
    await pump.resume("third", by="test")
    await pump.wait_idle()
    assert [s["n"] for s in handlers.seen] == [str(k) for k in range(10)]
    assert [s["message_id"] for s in handlers.seen] == [a.message_id for a in accepted]
    await assert_live_equals_replay(pump, log)


async def test_kill_cancels_the_handler_in_flight_and_closes_the_thread(
        pump: Pump, log: FileLog) -> None:
    accepted = await pump.inject(item(1), to="slow")
    await pump.wait_until(lambda: bool(handlers.entered))
    queued = await pump.inject(item(2), to="slow", thread_id=accepted.thread_id)
    assert await pump.kill_thread(accepted.thread_id, by="test")
    handlers.gate.set()  # had the handler survived, it would now send to third
    await pump.wait_idle()
    assert not [s for s in handlers.seen if s["listener"] == "third"]
    dropped = await events_of(log, MessageDropped)
    assert {d.message_id for d in dropped} == {accepted.message_id, queued.message_id}
    assert pump.state.threads.threads[accepted.thread_id].status == "killed"
    with pytest.raises(ThreadClosedError):
        await pump.inject(item(3), to="third", thread_id=accepted.thread_id)
    records = [r async for r in log.read()]
    kill_at = next(r.position for r in records if isinstance(r.event, ThreadKilled))
    after = [type(r.event).__name__ for r in records[kill_at:]]
    assert set(after) <= {"MessageDropped", "MessageRejected"}
    await assert_live_equals_replay(pump, log)


async def test_a_handler_that_always_raises_ends_in_a_dead_letter(pump: Pump, log: FileLog
                                                                  ) -> None:
    accepted = await pump.inject(item(1), to="failing")
    await pump.wait_idle()
    failures = await events_of(log, HandlerFailed)
    assert [(f.attempt, f.error, f.will_retry) for f in failures] == [
        (1, "RuntimeError: boom on attempt 1", True),
        (2, "RuntimeError: boom on attempt 2", True),
        (3, "RuntimeError: boom on attempt 3", False),
    ]
    dead = await events_of(log, MessageDeadLettered)
    assert [(d.message_id, d.reason) for d in dead] == [
        (accepted.message_id, "RuntimeError: boom on attempt 3")]
    assert pump.state.threads.dead_letters == {accepted.message_id:
                                               "RuntimeError: boom on attempt 3"}
    assert pump.state.threads.threads[accepted.thread_id].status == "failed"
    await assert_live_equals_replay(pump, log)


async def test_timeouts_and_retries(pump: Pump, log: FileLog) -> None:
    await pump.inject(item(1), to="sleepy")
    await pump.inject(item(2), to="flaky")
    await pump.wait_idle()
    failures = await events_of(log, HandlerFailed)
    assert ("sleepy", "The handler timed out after 0.05s.", False) in [
        (f.listener, f.error, f.will_retry) for f in failures]
    flaky = [s["attempt"] for s in handlers.seen if s["listener"] == "flaky"]
    assert flaky == [1, 2]
    await assert_live_equals_replay(pump, log)


async def test_bad_injections_are_refused_and_recorded(pump: Pump, log: FileLog) -> None:
    with pytest.raises(UnknownListenerError) as info:
        await pump.inject(item(1), to="thrid")
    assert info.value.message.startswith("There is no listener 'thrid' in organism "
                                         "'pump-test'. Did you mean 'third'?")
    with pytest.raises(PayloadError):
        await pump.inject("<Item><m>1</m></Item>", to="third")
    rejected = await events_of(log, MessageRejected)
    assert [(r.reason, r.to) for r in rejected] == [("unknown_listener", "thrid"),
                                                    ("invalid_payload", "third")]


async def test_idempotency_key_returns_the_original_ids(pump: Pump, log: FileLog) -> None:
    first = await pump.inject(item(1), to="third", idempotency_key="k-1")
    again = await pump.inject(item(1), to="third", idempotency_key="k-1")
    assert (again.message_id, again.thread_id, again.duplicate) == (
        first.message_id, first.thread_id, True)
    await pump.wait_idle()
    assert len(await events_of(log, MessageAccepted)) == 1


async def test_a_full_mailbox_answers_busy(pump: Pump) -> None:
    await pump.pause("third", by="test")
    first = await pump.inject(item(0), to="third", idempotency_key="k0")
    for k in range(1, 200):
        await pump.inject(item(k), to="third")
    with pytest.raises(MailboxFullError):
        await pump.inject(item(200), to="third")
    # Refused before parsing, so bad input is not even looked at (and not recorded) while
    # full; a retry whose key was recorded still gets its original ids.
    rejected = pump.state.threads.rejected
    with pytest.raises(MailboxFullError):
        await pump.inject("<Item><n>unclosed", to="third")
    assert pump.state.threads.rejected == rejected
    again = await pump.inject(item(0), to="third", idempotency_key="k0")
    assert (again.message_id, again.thread_id) == (first.message_id, first.thread_id)
    await pump.resume("third", by="test")
    await pump.wait_idle()
    assert len(handlers.seen) == 200


async def test_restart_redelivers_unfinished_messages(organism_path: Path, tmp_path: Path
                                                      ) -> None:
    organism = load_organism(organism_path)
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log, stop_timeout=0.01) as pump:
        await pump.pause("third", by="test")
        accepted = await pump.inject(item(1), to="third")
        blocked = await pump.inject(item(2), to="slow")
        await pump.wait_until(lambda: bool(handlers.entered))
    await log.aclose()
    handlers.reset()
    handlers.gate.set()
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log) as pump:
        await pump.wait_idle()
        assert [(s["listener"], s["redelivery"]) for s in handlers.seen] == [("slow", True)]
        assert handlers.seen[0]["message_id"] == blocked.message_id
        await pump.resume("third", by="test")
        await pump.wait_idle()
        third = [s for s in handlers.seen if s["listener"] == "third"]
        assert third[0]["message_id"] == accepted.message_id
        assert third[0]["redelivery"] is False
        await assert_live_equals_replay(pump, log)
    await log.aclose()


async def test_a_malformed_thread_id_is_refused_without_using_a_slot(pump: Pump, log: FileLog
                                                                    ) -> None:
    for _ in range(300):  # more than the mailbox holds
        with pytest.raises(EnvelopeError) as info:
            await pump.inject(item(1), to="third", thread_id="my thread")
    assert info.value.message == (
        "The thread id 'my thread' is not valid: use 1 to 128 letters, digits, '_', '.', ':' "
        "or '-', or leave it out to start a new thread.")
    assert pump.mailbox("third").statistics().queued == 0
    accepted = await pump.inject(item(2), to="third", thread_id="my-thread")
    assert accepted.thread_id == "my-thread"
    await pump.wait_idle()
    assert [r.reason for r in await events_of(log, MessageRejected)] == ["invalid_envelope"] * 300


async def test_a_lone_surrogate_from_a_handler_is_recorded_not_fatal(pump: Pump, log: FileLog
                                                                    ) -> None:
    with pytest.raises(UnknownListenerError):
        await pump.inject(item(1), to="thi\ud800rd")
    rejected = await events_of(log, MessageRejected)
    assert rejected[-1].to == "thi\\ud800rd"
    await pump.inject(item(2), to="third")  # the log still takes appends
    await pump.wait_idle()
    assert [s["n"] for s in handlers.seen] == ["2"]


# ------------------------------------------------------------ the bus's own names

@pytest.mark.parametrize("name", ["api", "cli", "system"])
async def test_an_envelope_for_a_name_of_the_bus_is_refused_like_an_unknown_listener(
        pump: Pump, log: FileLog, name: str) -> None:
    """``api``, ``cli`` and ``system`` only ever receive replies: as the ``to`` of an envelope
    they are no listener, as with ``to=``."""
    envelope = (f'<message xmlns="{ENVELOPE_NS}"><meta><to>{name}</to></meta>'
                '<Item xmlns=""><n>1</n></Item></message>')
    refusals = []
    for data, to in ((envelope, None), (item(1), name)):
        with pytest.raises(UnknownListenerError) as info:
            await pump.inject(data, to=to)
        refusals.append(info.value.message)
    assert refusals[0] == refusals[1]
    assert refusals[0].startswith(f"There is no listener {name!r} in organism 'pump-test'.")
    rejected = await events_of(log, MessageRejected)
    assert [(r.reason, r.to) for r in rejected] == [("unknown_listener", name)] * 2
    assert await events_of(log, MessageAccepted) == []
    assert pump.state.threads.threads == {}


# ------------------------------------------------------------ what the log holds is read back

SMALL = ORGANISM.replace("organism: {name: pump-test}",
                         "organism: {name: pump-test, limits: {max_bytes: 4096}}")


async def test_a_queued_message_at_the_size_cap_is_delivered_after_a_restart(
        tmp_path: Path) -> None:
    """The envelope around a payload of ``limits.max_bytes`` is larger than the cap, and the
    cap may be lowered before the restart: the bus reads back what it accepted regardless."""
    path = write_organism(tmp_path / "org", SMALL, schemas={"item.xsd": ITEM_XSD})
    log = await open_file_log(tmp_path / "events")
    async with open_pump(load_organism(path), log) as pump:
        await pump.pause("third", by="test")
        at_cap = "<Item><n>" + "x" * (4096 - 20) + "</n></Item>"
        accepted = await pump.inject(at_cap, to="third")
    await log.aclose()
    path.write_text(path.read_text().replace("max_bytes: 4096", "max_bytes: 256"))
    handlers.reset()
    log = await open_file_log(tmp_path / "events")
    async with open_pump(load_organism(path), log) as pump:
        await pump.resume("third", by="test")
        await pump.wait_idle()
    await log.aclose()
    assert [(s["message_id"], len(s["n"])) for s in handlers.seen] == [
        (accepted.message_id, 4096 - 20)]


async def test_a_worker_lets_the_loop_run_while_it_drains_a_backlog(
        pump: Pump, monkeypatch: pytest.MonkeyPatch) -> None:
    # The handler returns without suspending; draining a backlog must still leave the event
    # loop turns for everything else (HTTP, /health) along the way: every TURN deliveries
    # (made smaller than the backlog, which the mailbox here caps at 200).
    monkeypatch.setattr(delivery, "TURN", 16)
    await pump.pause("third", by="test")
    for k in range(150):
        await pump.inject(item(k), to="third")
    await pump.resume("third", by="test")
    seen = []
    while not seen or seen[-1]:
        await asyncio.sleep(0)
        seen.append(pump.mailbox("third").statistics().queued)
    assert len(seen) > 2 and seen == sorted(seen, reverse=True)
    await pump.wait_idle()
    assert [s["n"] for s in handlers.seen] == [str(k) for k in range(150)]

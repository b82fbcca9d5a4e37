"""Leases: a delivery is a lease, and only the current lease's holder changes anything."""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.conftest import write_organism
from tests.test_pump import ITEM_XSD, item
from xml_pipeline.config import load_organism
from xml_pipeline.errors import LeaseLostError
from xml_pipeline.events import (
    Event,
    HandlerFailed,
    HandlerSucceeded,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    MessageDropped,
    MessageRejected,
    MessageRetried,
    Recorded,
)
from xml_pipeline.log.memory import MemoryLog
from xml_pipeline.runtime.pump import Pump, open_pump
from xml_pipeline.state import State, project, replay
from xml_pipeline.state.scheduling import Lease, check, grant

HANDLERS = '''
import asyncio

contexts = []
release = asyncio.Event()


async def keeper(payload, ctx):
    """Keeps its context for later (a background task would), and returns at once."""
    contexts.append(ctx)


async def blocker(payload, ctx):
    """Holds its message until the thread is killed (or its timeout)."""
    contexts.append(ctx)
    await asyncio.Event().wait()


async def sink(payload, ctx):
    pass
'''

_modules = itertools.count()


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[tuple[Pump, MemoryLog, Any]]:
    module = f"lease_handlers_{next(_modules)}"
    path = write_organism(tmp_path / "org", f"""
        organism: {{name: leases}}
        listeners:
          - {{name: keeper, description: d, payload: schemas/item.xsd,
             handler: "{module}:keeper", peers: [sink]}}
          - {{name: blocker, description: d, payload: schemas/item.xsd,
             handler: "{module}:blocker", peers: [sink], timeout: 30s}}
          - {{name: sink, description: d, payload: schemas/item.xsd,
             handler: "{module}:sink"}}
        """, schemas={"item.xsd": ITEM_XSD}, modules={module: HANDLERS})
    log = MemoryLog()
    async with open_pump(load_organism(path), log) as pump:
        yield pump, log, sys.modules[module]  # loaded with the organism



async def events(log: MemoryLog, kind: type[Event]) -> list[Any]:
    return [r.event async for r in log.read() if isinstance(r.event, kind)]


# ------------------------------------------------------------------ the fold is the fence


def accepted(message_id: str = "m1", thread_id: str = "t1") -> MessageAccepted:
    return MessageAccepted(at=1.0, message_id=message_id, thread_id=thread_id, parent_id=None,
                           sender="api", to="worker", payload_type="Item", envelope="<x/>")


def delivered(lease_id: str, holder: str, *, attempt: int = 1,
              supersedes: str | None = None) -> MessageDelivered:
    return MessageDelivered(at=2.0, message_id="m1", listener="worker", attempt=attempt,
                            lease_id=lease_id, holder=holder, deadline=60.0,
                            supersedes=supersedes)


def fold(events: list[Event]) -> State:
    return project(Recorded(position, event) for position, event in enumerate(events, 1))


def projections(state: State) -> bytes:
    """Everything but the position: what an event that "changes nothing" leaves alone."""
    return msgspec.json.encode([state.agents, state.threads, state.budgets, state.scheduling],
                               order="sorted")


@pytest.mark.parametrize("first, second", [("a", "b"), ("b", "a")])
def test_two_holders_racing_for_one_message_the_first_in_the_log_wins_in_every_fold(
        first: str, second: str) -> None:
    log = [accepted(), delivered(f"lease-{first}", first), delivered(f"lease-{second}", second),
           HandlerSucceeded(at=3.0, message_id="m1", listener="worker", duration_ms=1.0,
                            lease_id=f"lease-{second}")]
    states = [fold(log), fold(log)]
    for state in states:
        lease = state.scheduling.leases["m1"]
        assert (lease.holder, lease.lease_id) == (first, f"lease-{first}")
        assert state.threads.messages["m1"].status == "delivered"  # the loser's outcome: none
        assert state.agents.agents == {}
    assert states[0].digest() == states[1].digest()
    # The winner's outcome settles it; the loser learns it lost from the fold.
    winner = fold([*log, HandlerSucceeded(at=4.0, message_id="m1", listener="worker",
                                          duration_ms=1.0, lease_id=f"lease-{first}")])
    assert winner.threads.messages["m1"].status == "handled"
    assert winner.scheduling.leases == {}
    with pytest.raises(LeaseLostError, match=f"was superseded: {first} holds it"):
        check(states[0].scheduling, Lease(message_id="m1", attempt=1,
                                          lease_id=f"lease-{second}", holder=second,
                                          deadline=60.0))


@pytest.mark.parametrize("late", [
    HandlerSucceeded(at=9.0, message_id="m1", listener="worker", duration_ms=1.0,
                     lease_id="l1"),
    HandlerFailed(at=9.0, message_id="m1", listener="worker", attempt=1, error="late",
                  will_retry=False, lease_id="l1"),
    MessageDeadLettered(at=9.0, message_id="m1", listener="worker", reason="late",
                        lease_id="l1"),
    MessageRetried(at=9.0, message_id="m1", listener="worker", attempt=2, delay=0.0,
                   lease_id="l1"),
], ids=lambda e: type(e).__name__)
def test_a_late_outcome_from_a_lost_lease_changes_nothing(late: Event) -> None:
    # Lease l1 timed out (its holder's failure was recorded), l2 is the current lease.
    before = fold([
        accepted(), delivered("l1", "w1"),
        HandlerFailed(at=3.0, message_id="m1", listener="worker", attempt=1,
                      error="The handler timed out after 1s.", will_retry=True, lease_id="l1"),
        MessageRetried(at=3.0, message_id="m1", listener="worker", attempt=2, delay=0.0,
                       lease_id="l1"),
        delivered("l2", "w2", attempt=2, supersedes="l1")])
    after = State.decode(before.encode())
    after.apply(before.position + 1, late)
    assert projections(after) == projections(before)
    assert after.scheduling.leases["m1"].lease_id == "l2"
    with pytest.raises(LeaseLostError, match="Lease l1 on message m1 was superseded: w2"):
        check(after.scheduling, Lease(message_id="m1", attempt=1, lease_id="l1", holder="w1",
                                      deadline=60.0))


def test_a_kill_revokes_the_lease_and_the_holders_outcome_changes_nothing() -> None:
    state = fold([accepted(), delivered("l1", "w1"),
                  MessageDropped(at=3.0, message_id="m1", thread_id="t1",
                                 reason="thread killed")])
    assert state.scheduling.leases == {}
    before = projections(state)
    state.apply(state.position + 1, HandlerSucceeded(at=4.0, message_id="m1",
                                                     listener="worker", duration_ms=1.0,
                                                     lease_id="l1"))
    assert projections(state) == before
    with pytest.raises(LeaseLostError, match="Lease l1 on message m1 is over"):
        check(state.scheduling, Lease(message_id="m1", attempt=1, lease_id="l1",
                                      holder="w1", deadline=60.0))


def test_grant_refuses_a_message_another_holder_has_and_takes_over_a_superseded_lease() -> None:
    state = fold([accepted(), delivered("l1", "w1")])
    with pytest.raises(LeaseLostError, match="w1 holds it under lease l1"):
        grant(state.scheduling, state.threads, message_id="m1", listener="worker", attempt=2,
              lease_id="l2", holder="w2", at=5.0, deadline=65.0, redelivery=True)
    event = grant(state.scheduling, state.threads, message_id="m1", listener="worker",
                  attempt=2, lease_id="l2", holder="w2", at=5.0, deadline=65.0,
                  redelivery=True, supersedes="l1")
    state.apply(state.position + 1, event)
    assert state.scheduling.leases["m1"].holder == "w2"


def test_records_from_before_leases_fold_as_they_did() -> None:
    state = fold([accepted(), delivered("", ""), delivered("", "", attempt=2),
                  HandlerSucceeded(at=3.0, message_id="m1", listener="worker",
                                   duration_ms=1.0)])
    assert state.threads.messages["m1"].status == "handled"
    assert state.scheduling.leases == {}


# ------------------------------------------------------------------ holders in the pump


async def test_a_send_after_the_handler_returned_raises_lease_lost_and_sends_nothing(
        bus: tuple[Pump, MemoryLog, Any]) -> None:
    pump, log, handlers = bus
    accepted = await pump.inject(item(1), to="keeper")
    await pump.wait_idle()
    (ctx,) = handlers.contexts
    (lease,) = [e for e in await events(log, MessageDelivered) if e.listener == "keeper"]
    assert (ctx.deadline, ctx.attempt) == (lease.deadline, 1)
    with pytest.raises(LeaseLostError, match=f"under lease {lease.lease_id} of message "
                                             f"{lease.message_id}, which it no longer holds"):
        await ctx.send("sink", item(2))
    with pytest.raises(LeaseLostError):
        await ctx.reply(item(3))
    await pump.wait_idle()
    assert [m.to for m in await events(log, MessageAccepted)] == ["keeper"]
    assert [(r.reason, r.sender) for r in await events(log, MessageRejected)] == [
        ("lease_lost", "keeper"), ("lease_lost", "keeper")]
    assert pump.state.threads.threads[accepted.thread_id].status == "completed"
    assert pump.state.digest() == (await replay(log)).digest()


async def test_a_kill_revokes_the_lease_of_a_handler_in_flight(
        bus: tuple[Pump, MemoryLog, Any]) -> None:
    pump, log, handlers = bus
    accepted = await pump.inject(item(1), to="blocker")
    # In the handler, and its lease folded (the handler may start before that is durable).
    await pump.wait_until(lambda: len(handlers.contexts) == 1
                          and bool(pump.state.scheduling.leases))
    (ctx,) = handlers.contexts
    held = pump.statistics()
    blocker = next(entry for entry in held.listeners if entry.name == "blocker")
    assert (held.leases, held.idle, blocker.leased, blocker.in_flight) == (1, False, 1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        held.leases = 0  # type: ignore[misc]
    assert await pump.kill_thread(accepted.thread_id, by="test")
    await pump.wait_idle()
    with pytest.raises(LeaseLostError):
        await ctx.send("sink", item(2))
    assert pump.state.scheduling.leases == {}
    await pump.wait_idle()  # the refused send is recorded
    after = pump.statistics()
    assert (after.leases, after.idle, after.position) == (0, True, log.last_position)
    assert pump.state.threads.threads[accepted.thread_id].status == "killed"
    assert [e.message_id for e in await events(log, MessageDropped)] == [accepted.message_id]
    assert [m.to for m in await events(log, MessageAccepted)] == ["blocker"]


async def test_every_delivery_is_a_lease_recorded_before_its_outcome(
        bus: tuple[Pump, MemoryLog, Any]) -> None:
    pump, log, _ = bus
    for n in range(5):
        await pump.inject(item(n), to="sink")
    await pump.wait_idle()
    records = [r async for r in log.read()]
    leases = {r.event.message_id: (r.position, r.event) for r in records
              if isinstance(r.event, MessageDelivered)}
    outcomes = [r for r in records if isinstance(r.event, HandlerSucceeded)]
    assert len(outcomes) == len(leases) == 5
    for outcome in outcomes:
        position, lease = leases[outcome.event.message_id]
        assert position < outcome.position
        assert outcome.event.lease_id == lease.lease_id != ""
        assert lease.holder.endswith("/sink.0") and lease.deadline is not None
    assert len({lease.lease_id for _, lease in leases.values()}) == 5
    assert pump.state.scheduling.leases == {}


async def test_wait_outcome_returns_once_the_fold_has_the_outcome(
        bus: tuple[Pump, MemoryLog, Any]) -> None:
    pump, _, handlers = bus
    accepted = await pump.inject(item(1), to="blocker")
    with pytest.raises(KeyError):
        await pump.wait_outcome("no-such-message")
    await pump.wait_until(lambda: len(handlers.contexts) == 1
                          and bool(pump.state.scheduling.leases))
    assert pump.state.threads.messages[accepted.message_id].status == "delivered"
    await pump.kill_thread(accepted.thread_id, by="test")
    assert await pump.wait_outcome(accepted.message_id) in ("dropped", "ended")

"""The log seam: the pump folds whatever its log holds, whoever appended it.

The pump runs on the memory log with the test appending from outside, and on ``SharedLog``
(tests/shared_log.py), a second implementation with several writers, where another holder
races the pump's workers for a message: the log's order decides, the same way in every fold.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_organism
from tests.shared_log import SharedLog
from tests.test_pump import ITEM_XSD, item
from xml_pipeline.config import load_organism
from xml_pipeline.events import (
    AgentPaused,
    AgentResumed,
    Event,
    HandlerSucceeded,
    MessageAccepted,
    MessageDelivered,
    MessageDropped,
    ThreadKilled,
)
from xml_pipeline.log import EventLog
from xml_pipeline.log.memory import MemoryLog
from xml_pipeline.runtime.pump import Pump, open_pump
from xml_pipeline.state import replay

HANDLERS = '''
calls = []


async def sink(payload, ctx):
    calls.append(ctx.message_id)
'''

_modules = itertools.count()


@pytest.fixture
def organism(tmp_path: Path) -> Any:
    module = f"seam_handlers_{next(_modules)}"
    path = write_organism(tmp_path / "org", f"""
        organism: {{name: seam}}
        listeners:
          - {{name: sink, description: d, payload: schemas/item.xsd, handler: "{module}:sink"}}
        """, schemas={"item.xsd": ITEM_XSD}, modules={module: HANDLERS})
    loaded = load_organism(path)
    return loaded, sys.modules[module]



async def all_of(log: EventLog, kind: type[Event]) -> list[Any]:
    return [r.event async for r in log.read() if isinstance(r.event, kind)]


async def assert_every_fold_agrees(pump: Pump, log: EventLog) -> None:
    await pump.wait_idle()
    replayed = await replay(log)
    assert replayed.position == pump.state.position == log.last_position
    assert replayed.digest() == pump.state.digest()


# ------------------------------------------------------------------ another writer's records


@pytest.fixture
async def on_memory(organism: Any) -> AsyncIterator[tuple[Pump, MemoryLog, Any]]:
    loaded, handlers = organism
    log = MemoryLog()
    async with open_pump(loaded, log) as pump:
        yield pump, log, handlers


async def test_the_pump_folds_and_acts_on_records_another_writer_appends(
        on_memory: tuple[Pump, MemoryLog, Any]) -> None:
    pump, log, handlers = on_memory
    await log.append([AgentPaused(at=1.0, agent="sink", by="elsewhere", reason="upgrade")])
    await pump.wait_until(lambda: pump.mailbox("sink").statistics().paused)
    assert pump.state.agents.agents["sink"].paused_by == "elsewhere"
    accepted = await pump.inject(item(1), to="sink")
    await pump.wait_idle()
    assert handlers.calls == []  # paused by the other writer: it waits
    await log.append([AgentResumed(at=2.0, agent="sink", by="elsewhere")])
    await pump.wait_until(lambda: handlers.calls == [accepted.message_id])
    await assert_every_fold_agrees(pump, log)
    assert pump.state.threads.threads[accepted.thread_id].status == "completed"


async def test_a_kill_another_writer_records_drops_what_this_pump_holds(
        on_memory: tuple[Pump, MemoryLog, Any]) -> None:
    pump, log, handlers = on_memory
    await pump.pause("sink", by="test")
    accepted = await pump.inject(item(1), to="sink")
    await log.append([ThreadKilled(at=1.0, thread_id=accepted.thread_id, by="elsewhere")])
    await pump.wait_until(lambda: pump.mailbox("sink").statistics().queued == 0)
    await pump.resume("sink", by="test")
    await assert_every_fold_agrees(pump, log)
    assert handlers.calls == []
    assert [e.message_id for e in await all_of(log, MessageDropped)] == [accepted.message_id]
    assert pump.state.threads.threads[accepted.thread_id].status == "killed"


# ------------------------------------------------------------------ two holders, one message


def claim(message_id: str, lease_id: str = "theirs.1") -> MessageDelivered:
    return MessageDelivered(at=5.0, message_id=message_id, listener="sink", attempt=1,
                            lease_id=lease_id, holder="elsewhere/sink.0", deadline=65.0)


def done(message_id: str, lease_id: str = "theirs.1") -> HandlerSucceeded:
    return HandlerSucceeded(at=6.0, message_id=message_id, listener="sink", duration_ms=1.0,
                            lease_id=lease_id)


class Racing:
    """Handle ``mine`` of a shared log, where handle ``theirs`` appends its claim to a
    message just before (``first=True``) or just after this pump's claim to it."""

    def __init__(self, shared: SharedLog, *, first: bool) -> None:
        self.mine, self.theirs, self.first = shared.connect(), shared.connect(), first
        self.raced: list[str] = []
        append_nowait: Callable[[Sequence[Event]], Any] = self.mine.append_nowait

        def racing(events: Sequence[Event]) -> Any:
            ours = [e for e in events if isinstance(e, MessageDelivered)]
            if ours and self.first:
                self._claim(ours)
            future = append_nowait(events)
            if ours and not self.first:
                self._claim(ours)
            return future

        self.mine.append_nowait = racing  # type: ignore[method-assign]

    def _claim(self, ours: list[MessageDelivered]) -> None:
        for event in ours:
            self.raced.append(event.message_id)
            self.theirs.append_nowait([claim(event.message_id)])


@pytest.mark.parametrize("first", [True, False], ids=["theirs-first", "mine-first"])
async def test_two_holders_racing_for_a_message_on_a_shared_log_one_wins_in_every_fold(
        organism: Any, first: bool) -> None:
    loaded, handlers = organism
    racing = Racing(SharedLog(), first=first)
    async with open_pump(loaded, racing.mine) as pump:
        accepted = await pump.inject(item(1), to="sink")
        await pump.wait_idle()
        assert racing.raced == [accepted.message_id]
        leases = {e.holder: e for e in await all_of(racing.mine, MessageDelivered)}
        assert len(leases) == 2 and "elsewhere/sink.0" in leases
        if first:
            # Their claim came first: the pump's worker saw it lost and never ran the handler.
            assert handlers.calls == []
            assert pump.state.scheduling.leases[accepted.message_id].holder == "elsewhere/sink.0"
            await racing.theirs.append([done(accepted.message_id)])
            await pump.wait_until(lambda: not pump.state.scheduling.leases)
        else:
            # The pump's claim came first: its handler ran, their late outcome changes nothing.
            assert handlers.calls == [accepted.message_id]
            before = pump.state.threads.threads[accepted.thread_id].status
            await racing.theirs.append([done(accepted.message_id)])
            await pump.wait_idle()
            assert pump.state.threads.threads[accepted.thread_id].status == before
        await assert_every_fold_agrees(pump, racing.mine)
        assert pump.state.threads.threads[accepted.thread_id].status == "completed"
        succeeded = await all_of(racing.mine, HandlerSucceeded)
        assert len(succeeded) == (1 if first else 2)  # theirs, and ours if we won; one counts
        assert pump.state.agents.agents["sink"].succeeded == 1
        assert [m.to for m in await all_of(racing.mine, MessageAccepted)] == ["sink"]

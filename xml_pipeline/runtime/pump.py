"""The pump: the wiring of the runtime, and its public face.

``open_pump`` replays the log (from the newest snapshot), then, while the ledger follows the
log and folds it, records the start, recovers every unfinished message (``recovery``), runs
the workers (``delivery``) in one task group, and on exit stops gracefully: accept nothing
new, let in-flight handlers finish within ``stop_timeout``, record ``OrganismStopped``, save a
snapshot. Messages come in through ``inject`` (``router``); controls decide from the fold and
take effect from it (``effects``); ``statistics()`` and the ``wait_*`` methods are what
callers read. A snapshot is kept every ``snapshot_every`` records (``snapshotter``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from xml_pipeline.config import Listener, Organism
from xml_pipeline.errors import (
    BusyError,
    LogError,
    ThreadClosedError,
    UnknownListenerError,
    XmlPipelineError,
)
from xml_pipeline.events import (
    BudgetRaised,
    Event,
    MessageDeadLettered,
    MessageRetried,
    OrganismReloaded,
    OrganismStopped,
    ReloadRejected,
    UsageReset,
)
from xml_pipeline.histogram import Histogram
from xml_pipeline.log import EventLog
from xml_pipeline.runtime.delivery import Deliverer
from xml_pipeline.runtime.effects import Effects
from xml_pipeline.runtime.handlers import Payload
from xml_pipeline.runtime.ledger import Ledger
from xml_pipeline.runtime.llm import AgentRuntime
from xml_pipeline.runtime.mailbox import Mailbox
from xml_pipeline.runtime.recovery import delivery_of, recover, start_events
from xml_pipeline.runtime.router import Accepted, Router
from xml_pipeline.runtime.signal import Signal
from xml_pipeline.runtime.snapshotter import Snapshotter
from xml_pipeline.runtime.statistics import PumpStatistics, measure
from xml_pipeline.state import State, replay, restore
from xml_pipeline.state.agents import pause as decide_pause
from xml_pipeline.state.agents import resume as decide_resume
from xml_pipeline.state.budgets import raised as budget_raised
from xml_pipeline.state.threads import FINAL
from xml_pipeline.state.threads import kill as decide_kill
from xml_pipeline.types import Clock, system_clock

__all__ = ["Accepted", "Pump", "open_pump"]

_log = logging.getLogger("xml_pipeline.runtime.pump")

SNAPSHOT_EVERY = 100_000


class Pump:
    """Create with ``open_pump``. All methods run on the pump's event loop."""

    def __init__(self, *, organism: Organism, log: EventLog, clock: Clock,
                 mailbox_capacity: int, stop_timeout: float,
                 snapshot_every: int | None = SNAPSHOT_EVERY) -> None:
        self.organism = organism
        self.log = log
        self._clock = clock
        self._capacity = mailbox_capacity
        self._stop_timeout = stop_timeout
        self._mailboxes: dict[str, Mailbox] = {}
        self._ledger = Ledger(log=log, state=State(), clock=clock)
        self._commit_soon = self._ledger.commit_soon
        self._commit = self._ledger.commit
        self._outcome = self._ledger.outcome
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._group: asyncio.TaskGroup | None = None
        #: the position of the snapshot the last start replayed from (0: the whole log)
        self.replayed_from = 0
        self._snapshotter = Snapshotter(ledger=self._ledger, every=snapshot_every or 0)
        killed: set[str] = set()  # message ids whose handler a thread kill cancelled
        self._router = Router(ledger=self._ledger, clock=clock, organism=lambda: self.organism,
                              mailboxes=self._mailboxes, killed=killed)
        self._agents = AgentRuntime(ledger=self._ledger, clock=clock,
                                    organism=lambda: self.organism)
        self._deliverer = Deliverer(ledger=self._ledger, clock=clock, mailboxes=self._mailboxes,
                                    listeners=lambda: self.organism.listeners,
                                    send=self._router.send, killed=killed,
                                    agent=self._agents.handle)
        self._effects = Effects(ledger=self._ledger, clock=clock, mailboxes=self._mailboxes,
                                deliverer=self._deliverer)
        self._ledger.observers.append(self._on_event)
        self._ledger.observers.append(self._effects)

    # ------------------------------------------------------------ state, through the ledger

    @property
    def state(self) -> State:
        return self._ledger.state

    def clock(self) -> float:
        return self._clock()

    @property
    def append_latency(self) -> Histogram:
        return self._ledger.append_latency

    def observe(self, observer: Callable[[int, Event], None]) -> None:
        """Call ``observer(position, event)`` for every event folded from now on."""
        self._ledger.observers.append(observer)

    @property
    def fault(self) -> BaseException | None:
        """The last append failure, if the log is failing (cleared by a good append)."""
        return self._ledger.fault

    @property
    def _signal(self) -> Signal:
        return self._ledger.signal

    # ------------------------------------------------------------ workers

    def _spawn_workers(self, name: str, first: int, last: int) -> None:
        assert self._group is not None
        for index in range(first, last):
            self._workers.append(self._group.create_task(
                self._deliverer.worker(name, index), name=f"worker:{name}:{index}"))

    # ------------------------------------------------------------ reload, redrive, usage

    async def swap(self, organism: Organism, event: OrganismReloaded) -> None:
        """Record ``event`` (a validated reload), then put ``organism`` in force: added
        listeners get mailboxes and workers at once, removed ones have their queued messages
        dead-lettered, changed ones take effect from their next delivery."""
        await self._commit([event])
        old, self.organism = self.organism, organism
        if organism.log.snapshot_every != old.log.snapshot_every:
            self.snapshot_every = organism.log.snapshot_every
        for name in event.added:
            self._mailboxes[name] = Mailbox(capacity=self._capacity)
            self._spawn_workers(name, 0, organism.listeners[name].concurrency)
        for name in event.removed:
            mailbox = self._mailboxes.pop(name)
            for delivery in mailbox.drain():
                self._commit_soon(self._outcome(delivery.thread_id, [MessageDeadLettered(
                    at=self._clock(), message_id=delivery.message_id, listener=name,
                    reason=f"Listener {name!r} was removed from the organism by a reload.")]))
            mailbox.close()
        for name in event.updated:
            before, after = old.listeners[name].concurrency, organism.listeners[name].concurrency
            if after > before:
                self._spawn_workers(name, before, after)
            self._mailboxes[name].wake()

    async def record_rejected_reload(self, error: str) -> None:
        await self._commit([ReloadRejected(at=self._clock(), error=error)])

    async def retry_dead_letter(self, message_id: str, *, by: str) -> bool:
        """Deliver a dead-lettered message again (``MessageRetried``). False if ``message_id``
        is not a dead letter."""
        threads = self.state.threads
        info = threads.messages.get(message_id)
        if message_id not in threads.dead_letters or info is None:
            return False
        if info.to not in self._mailboxes:
            raise UnknownListenerError(
                f"Dead letter {message_id} was for listener {info.to!r}, which the organism no "
                "longer has; add it back before retrying.")
        if self._deliverer.thread_killed(info.thread_id):
            raise ThreadClosedError(f"Thread {info.thread_id} was killed; its messages cannot "
                                    "be retried.")
        delivery = await delivery_of(self.log, info)
        if delivery is None:
            return False
        await self._commit([MessageRetried(at=self._clock(), message_id=message_id,
                                           listener=info.to, attempt=info.attempts + 1,
                                           delay=0.0, by=by)])
        self._ledger.opened(info.thread_id)
        self._mailboxes[info.to].put(delivery, reserved=False)
        return True

    async def raise_budget(self, scope: str, key: str, max_tokens: int, *, by: str
                           ) -> BudgetRaised:
        """Set a budget's limit (``BudgetRaised``); the waiting calls it frees go on at once,
        those another budget still holds (its ``held``) stay parked. Returns the event."""
        event = budget_raised(self.state.budgets, scope=scope, key=key, max_tokens=max_tokens,
                              at=self._clock(), by=by, organism=self.organism.name)
        await self._commit([event])
        return event

    def _on_event(self, position: int, event: Event) -> None:
        if position >= self._snapshotter.due:
            self._snapshotter.save_nowait(self._group)

    async def reset_usage(self, *, by: str) -> None:
        await self._commit([UsageReset(at=self._clock(), by=by)])

    # ------------------------------------------------------------ snapshots

    @property
    def snapshot_every(self) -> int:
        """Records between periodic snapshots (0: only at stop); a reload may change it."""
        return self._snapshotter.every

    @snapshot_every.setter
    def snapshot_every(self, records: int) -> None:
        self._snapshotter.every = records

    # ------------------------------------------------------------ start and recovery

    async def _replay(self) -> None:
        snapshot = await restore(self.log)
        self.replayed_from = 0 if snapshot is None else snapshot.position
        self._ledger.state = await replay(self.log, state=snapshot)
        self._snapshotter.start(after=self.replayed_from)

    async def _start(self) -> None:
        """Record the start and recover (once the ledger follows the log)."""
        # After a crash (no OrganismStopped last), any pending message may have been seen.
        clean_start = self.state.agents.status in ("new", "stopped")
        await self._commit(start_events(self.state, self.organism, at=self._clock()))
        for name in self.organism.listeners:
            mailbox = Mailbox(capacity=self._capacity)
            info = self.state.agents.agents.get(name)
            if info is not None and info.status == "paused":
                mailbox.pause()
            self._mailboxes[name] = mailbox
        outcomes = await recover(self.state, self.log, self._mailboxes,
                                 clean_start=clean_start, at=self._clock())
        if outcomes:
            await self._commit(outcomes)
        self._ledger.count_open()

    # ------------------------------------------------------------ accepting messages

    async def inject(self, data: Payload, *, to: str | None = None, thread_id: str | None = None,
                     sender: str = "api", idempotency_key: str | None = None,
                     wait: bool = False) -> Accepted:
        """Accept a message from outside: a full envelope (``to`` None) or a payload for ``to``.

        Returns once the message is durable. Raises an ``XmlError``/``RoutingError`` subclass
        (recorded as ``MessageRejected``) or, when the target's mailbox is full, waits for room
        (``wait=True``) or raises ``MailboxFullError`` (not recorded: try again later).
        """
        if self._stopping:
            raise BusyError("The organism is stopping; it accepts no new messages.")
        return await self._router.inject(data, to=to, thread_id=thread_id, sender=sender,
                                         idempotency_key=idempotency_key, wait=wait)

    def _listener(self, name: str) -> Listener:
        return self._router.listener(name)

    async def reject_input(self, exc: XmlPipelineError, *, raw: Any, sender: str,
                           to: str | None, code: str | None = None) -> None:
        """Record input refused before it reached ``inject`` (a bad HTTP body, say)."""
        await self._router.reject(exc, raw=raw, sender=sender, to=to, thread_id=None,
                                  parent_id=None, code=code)

    # ------------------------------------------------------------ control

    # Each control decides from the fold (``state.agents.pause`` and the like return the
    # event, or None when there is nothing to do) and commits; its effect (a mailbox paused,
    # a thread's messages dropped) follows the fold of the event (``effects``), so that the
    # same event appended by another writer of a shared log has the same effect here.

    async def pause(self, agent: str, *, by: str, reason: str = "") -> str:
        """Pause ``agent``: it receives nothing until resumed; its messages wait, in order.
        A message in flight finishes. Returns the agent's state."""
        self._listener(agent)
        event = decide_pause(self.state.agents, agent, at=self._clock(), by=by, reason=reason)
        if event is not None:
            await self._commit([event])
        return "paused"

    async def resume(self, agent: str, *, by: str) -> str:
        self._listener(agent)
        event = decide_resume(self.state.agents, agent, at=self._clock(), by=by)
        if event is not None:
            await self._commit([event])
        return "running"

    async def kill_thread(self, thread_id: str, *, by: str, reason: str = "") -> bool:
        """Kill a thread: drop its queued messages, cancel its handlers, refuse new messages.
        Returns False if the thread does not exist; returns once the drops are recorded."""
        try:
            event = decide_kill(self.state.threads, thread_id, at=self._clock(), by=by,
                                reason=reason)
        except KeyError:
            return False
        if event is not None:
            await self._commit([event])
        await self._effects.wait_dropped(thread_id)
        return True

    # ------------------------------------------------------------ waiting and stopping

    def _idle(self) -> bool:
        return (not self._router.busy and self._ledger.idle
                and all(m.idle for m in self._mailboxes.values()))

    async def wait_idle(self) -> None:
        """Return once nothing is being accepted or handled and nothing deliverable waits."""
        await self.wait_until(self._idle)

    async def wait_outcome(self, message_id: str) -> str:
        """The status of ``message_id`` once the fold has its final outcome (``ended``: its
        thread ended and was forgotten). ``KeyError`` for a message the state lacks."""
        threads = self.state.threads
        if message_id not in threads.messages:
            raise KeyError(message_id)

        def final() -> bool:
            info = threads.messages.get(message_id)
            return info is None or info.status in FINAL

        await self.wait_until(final)
        info = threads.messages.get(message_id)
        return "ended" if info is None else info.status

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition()`` holds, checking it after every change the pump makes
        (a message accepted, an outcome folded, a handler entered, a snapshot written)."""
        while not condition():
            await self._signal.wait()

    @property
    def snapshotting(self) -> bool:
        """Whether a periodic snapshot is being written now."""
        return self._snapshotter.saving

    def mailbox(self, name: str) -> Mailbox:
        return self._mailboxes[name]

    def statistics(self) -> PumpStatistics:
        """The pump as it is now, in one frozen value (what ``/metrics`` and the API show)."""
        fault = self.fault
        return measure(self.state, self._mailboxes, idle=self._idle(), stopping=self._stopping,
                       fault=None if fault is None else str(fault), log=self.log.statistics())

    async def _stop(self, reason: str) -> None:
        self._stopping = True
        self._snapshotter.stop()
        for mailbox in self._mailboxes.values():
            mailbox.pause()  # not recorded: queued messages stay pending and are redelivered

        async def in_flight_done() -> None:
            while self._deliverer.in_handler or self._router.busy:
                await self._signal.wait()

        try:
            async with asyncio.timeout(self._stop_timeout):
                await in_flight_done()
        except TimeoutError:
            _log.warning("stopping: %d handlers still running after %gs; cancelling them",
                         len(self._deliverer.in_handler), self._stop_timeout)
        for task in self._workers:
            task.cancel()
        try:
            await self._commit([OrganismStopped(at=self._clock(), reason=reason)])
        except LogError as exc:
            _log.error("could not record OrganismStopped: %s", exc)
            return
        # A snapshot makes the next start fast. A periodic one still being written finishes
        # first; this one, of the final state, supersedes it.
        await self._snapshotter.save()


@asynccontextmanager
async def open_pump(organism: Organism, log: EventLog, *, clock: Clock = system_clock,
                    mailbox_capacity: int = 1000, stop_timeout: float = 10.0,
                    snapshot_every: int | None = SNAPSHOT_EVERY) -> AsyncIterator[Pump]:
    """Run ``organism`` on ``log`` for the duration of the ``async with`` block. The log keeps
    a snapshot every ``snapshot_every`` records (0 or None: only on stop)."""
    pump = Pump(organism=organism, log=log, clock=clock, mailbox_capacity=mailbox_capacity,
                stop_timeout=stop_timeout, snapshot_every=snapshot_every)
    await pump._replay()
    async with pump._ledger.running():
        await pump._start()
        async with asyncio.TaskGroup() as group:
            pump._group = group
            for name, listener in organism.listeners.items():
                pump._spawn_workers(name, 0, listener.concurrency)
            # After a failed append, find out when the log works again.
            pump._workers.append(group.create_task(pump._ledger.recover(log.probe),
                                                   name="log-recovery"))
            try:
                yield pump
            finally:
                await pump._stop("stopped")

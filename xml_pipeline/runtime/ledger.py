"""The ledger: the pump's write-ahead path. Events are appended, then folded.

``commit_soon`` queues events; every commit made in one turn of the event loop shares one
append (one write batch). The state is folded from the log itself: ``running()`` follows the
log (``EventLog.follow``) and folds every record it gives, in log order, with the same
``State.apply`` a replay uses, whoever appended it (this pump, or another writer of a shared
log). A commit's future is done once the log says its events are durable and the fold has
reached them. The ledger also records ``ThreadCompleted`` when the last open message of a
thread finishes, in the same append as that outcome when it can tell ahead of the fold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

from xml_pipeline.events import (
    Event,
    HandlerSucceeded,
    MessageDeadLettered,
    MessageDropped,
    ThreadCompleted,
)
from xml_pipeline.histogram import Histogram
from xml_pipeline.log import EventLog
from xml_pipeline.runtime.signal import Signal
from xml_pipeline.state import State
from xml_pipeline.types import Clock

__all__ = ["Ledger"]

_log = logging.getLogger("xml_pipeline.runtime.pump")
_OUTCOMES = (HandlerSucceeded, MessageDeadLettered, MessageDropped)
_Batch = list[tuple[list[Event], "asyncio.Future[list[int]]"]]
#: an append the log made durable: its last position, the batch and the positions
_Durable = tuple[int, _Batch, list[int]]


class Ledger:
    def __init__(self, *, log: EventLog, state: State, clock: Clock) -> None:
        self.log = log
        self.state = state
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._buffer: _Batch = []
        self._flush_scheduled = False
        self._durable: deque[_Durable] = deque()  # appended, waiting for the fold to reach
        self._settle_scheduled = False
        self._finished: list[str] = []  # threads whose message the fold just closed
        self._completing: set[str] = set()  # threads whose ThreadCompleted is on its way
        self._open: dict[str, int] = {}  # open messages per thread, ahead of the fold
        self.appending = 0  # commits not yet folded (or failed)
        self.fault: BaseException | None = None
        self.signal = Signal()
        #: called with (position, event) for every event folded, in order (metrics, tails)
        self.observers: list[Callable[[int, Event], None]] = []
        self.append_latency = Histogram()

    @property
    def idle(self) -> bool:
        return not self.appending and not self._buffer and not self._settle_scheduled

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Fold the log as it grows, from ``state.position`` on, for the duration of the
        block; the task that follows it is cancelled and awaited on the way out (and its
        failure, a record that cannot be read, raised there)."""
        task = asyncio.create_task(self._follow(), name="ledger")
        try:
            yield
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise

    async def _follow(self) -> None:
        state = self.state
        apply = state.apply
        observers = self.observers
        finished = self._finished
        async for record in self.log.follow(after=state.position):
            position, event = record.position, record.event
            if position <= state.position:
                continue
            apply(position, event)
            for observer in observers:
                observer(position, event)
            if isinstance(event, _OUTCOMES):
                message = state.threads.messages.get(event.message_id)
                if message is not None:
                    finished.append(message.thread_id)
            elif isinstance(event, ThreadCompleted):
                self._completing.discard(event.thread_id)
            durable = self._durable
            if durable and durable[0][0] <= position:
                self._settle()  # the end of a commit of ours: its waiters go on at once
            elif not self._settle_scheduled:
                self._settle_scheduled = True
                self._loop.call_soon(self._settle)

    async def wait_healthy(self) -> None:
        """Return once the log takes appends (at once, unless an append failed)."""
        while self.fault is not None:
            await self.signal.wait()

    async def recover(self, probe: Callable[[], Awaitable[None]], *,
                      interval: float = 0.5) -> None:
        """Forever: when an append has failed, call ``probe`` (which raises while the log
        still cannot be written) every ``interval`` seconds, and clear the fault when it
        succeeds. Owned by the pump's task group."""
        while True:
            while self.fault is None:
                await self.signal.wait()
            await asyncio.sleep(interval)
            if self.appending:
                continue  # let the failed batches settle first
            try:
                await probe()
            except Exception as exc:  # still failing: keep the newest reason
                self.fault = exc
                continue
            _log.warning("the event log can be written again; resuming")
            self.fault = None
            self.notify()

    def reopen(self, thread_id: str) -> None:
        """A message of ``thread_id`` whose outcome could not be recorded goes back to its
        mailbox: count it as open again."""
        self._open[thread_id] = self._open.get(thread_id, 0) + 1

    def count_open(self) -> None:
        """Start counting open messages per thread from the folded state."""
        self._open = {thread_id: thread.open_count
                      for thread_id, thread in self.state.threads.threads.items()
                      if thread.open_count > 0}

    def opened(self, thread_id: str) -> None:
        """A message for a listener was accepted into ``thread_id``."""
        self._open[thread_id] = self._open.get(thread_id, 0) + 1
        self._completing.discard(thread_id)

    def closed(self, thread_id: str) -> None:
        """The thread was killed: its messages are no longer counted."""
        self._open.pop(thread_id, None)

    def commit_soon(self, events: list[Event]) -> asyncio.Future[list[int]]:
        """Append ``events`` soon, in call order; they are folded into ``state`` once durable.

        Every commit made in one turn of the event loop shares one append (one write batch,
        one fold). Returns a future of the events' positions, done after they are folded."""
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._buffer.append((events, future))
        self.appending += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    async def commit(self, events: list[Event]) -> list[int]:
        """Append ``events`` and return once they are durable and folded."""
        return await asyncio.shield(self.commit_soon(events))

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        if self.fault is not None:
            # Once an append failed, nothing is appended until a probe shows the log works
            # again (``recover``): events after a lost one must not become durable without it.
            self._failed(batch, self.fault)
            return
        events = [event for part, _ in batch for event in part]
        try:
            future = self.log.append_nowait(events)
        except Exception as exc:  # a closed or failed log: nothing was appended
            self._failed(batch, exc)
            return
        future.add_done_callback(partial(self._appended, batch, time.perf_counter()))

    def _failed(self, batch: list[tuple[list[Event], asyncio.Future[list[int]]]],
                exc: BaseException) -> None:
        self.appending -= len(batch)
        if self.fault is None:
            _log.error("an append failed; nothing more is recorded until the log works "
                       "again: %s", exc)
        self.fault = exc
        for part, _ in batch:
            for event in part:
                if isinstance(event, ThreadCompleted):
                    self._completing.discard(event.thread_id)
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here: fire-and-forget commits log it above
        self.notify()

    def _appended(self, batch: _Batch, started: float,
                  future: asyncio.Future[list[int]]) -> None:
        if future.cancelled():
            self._failed(batch, asyncio.CancelledError())
            return
        error = future.exception()
        if error is not None:
            self._failed(batch, error)
            return
        self.append_latency.observe((time.perf_counter() - started) * 1000)
        positions = future.result()
        if positions:
            self._durable.append((positions[-1], batch, positions))
        else:
            for _, part_future in batch:
                if not part_future.done():
                    part_future.set_result([])
            self.appending -= len(batch)
        self._settle()

    def _settle(self) -> None:
        """Finish what the fold has reached: commits whose events it folded, threads whose
        last open message it closed; then wake whoever waits."""
        self._settle_scheduled = False
        state = self.state
        durable = self._durable
        while durable and durable[0][0] <= state.position:
            _, batch, positions = durable.popleft()
            self.appending -= len(batch)
            start = 0
            for part, part_future in batch:
                if not part_future.done():
                    part_future.set_result(positions[start:start + len(part)])
                start += len(part)
        # A thread whose last open message just finished is complete (if the worker did not
        # already record it with the outcome).
        finished = self._finished[:]  # the follower appends to this very list
        self._finished.clear()
        for thread_id in finished:
            thread = state.threads.threads.get(thread_id)
            if (thread is not None and thread.status == "active" and thread.open_count == 0
                    and thread_id not in self._completing):
                self._completing.add(thread_id)
                self.commit_soon([ThreadCompleted(at=self._clock(), thread_id=thread_id)])
        self.notify()

    def outcome(self, thread_id: str, events: list[Event]) -> list[Event]:
        """``events`` (closing one message of ``thread_id``), plus ``ThreadCompleted`` when that
        was the thread's last open message, so both share one append."""
        remaining = self._open.get(thread_id, 0) - 1
        if remaining > 0:
            self._open[thread_id] = remaining
            return events
        self._open.pop(thread_id, None)
        if thread_id in self._completing:
            return events
        self._completing.add(thread_id)
        return [*events, ThreadCompleted(at=self._clock(), thread_id=thread_id)]

    def notify(self) -> None:
        """Wake whoever waits for a change (an event nobody waits on needs no replacing)."""
        self.signal.notify()


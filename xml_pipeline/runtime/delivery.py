"""Delivery: the workers that take messages from mailboxes and run handlers.

Each listener has ``concurrency`` workers, each a holder of leases. A worker takes a lease on
the message (``MessageDelivered``, decided by ``scheduling.grant`` from the fold), runs the
handler under the listener's timeout (the lease's deadline), and records the outcome under
that lease (``HandlerSucceeded``, ``HandlerFailed`` with ``MessageRetried`` or
``MessageDeadLettered``, or ``MessageDropped`` for a killed thread). Once the call is over, or
its thread killed, the lease is no longer held: a send through its context raises
``LeaseLostError``. Outcomes are committed without waiting for the fsync: the log keeps their
order (the lease first), and a crash before they are durable only means a redelivery.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from xml_pipeline.config import Listener
from xml_pipeline.errors import (
    BudgetExhaustedError,
    BusyError,
    LeaseLostError,
    LogError,
    PayloadError,
)
from xml_pipeline.events import (
    Event,
    HandlerFailed,
    HandlerSucceeded,
    MessageDeadLettered,
    MessageDropped,
    MessageRetried,
)
from xml_pipeline.runtime.handlers import Context, HandlerInfo, Payload
from xml_pipeline.runtime.ledger import Ledger
from xml_pipeline.runtime.mailbox import Delivery, Mailbox
from xml_pipeline.state.scheduling import Lease, check, grant
from xml_pipeline.types import Clock

__all__ = ["Deliverer"]

SendFunction = Callable[[Listener, Delivery, Lease, str, Payload], Awaitable[str | None]]
AgentFunction = Callable[[Listener, Any, Context], Awaitable[None]]


class Held(enum.Enum):
    """What ``call`` returns when the handler's outcome is neither success nor an error."""

    PARKED = "parked"  # it could not run for lack of budget: the thread waits for a raise
    REQUEUE = "requeue"  # the log failed while it ran: it is handled again later



_log = logging.getLogger("xml_pipeline.runtime.pump")

#: deliveries a worker makes before it lets the rest of the event loop run
TURN = 256

class Deliverer:
    def __init__(self, *, ledger: Ledger, clock: Clock, mailboxes: dict[str, Mailbox],
                 listeners: Callable[[], Mapping[str, Listener]], send: SendFunction,
                 killed: set[str], agent: AgentFunction | None = None) -> None:
        self._ledger = ledger
        self._commit_soon = ledger.commit_soon
        self._outcome = ledger.outcome
        self._clock = clock
        self.mailboxes = mailboxes
        self._listeners = listeners
        self._send = send
        self.in_handler: dict[str, tuple[asyncio.Task[Any], Delivery]] = {}
        self.killed = killed  # message ids cancelled by a thread kill (shared with routing)
        self._agent = agent
        #: thread id -> deliveries waiting for a budget raise (the call was not made)
        self.parked: dict[str, list[tuple[str, Delivery]]] = {}
        self._loggers: dict[str, logging.Logger] = {}
        #: this process's holders are "host:pid/listener.worker"; lease ids are unique to it
        self._process = f"{socket.gethostname()}:{os.getpid()}"
        self._lease_prefix = secrets.token_hex(5) + "."
        self._lease_numbers = itertools.count(1)

    def thread_killed(self, thread_id: str) -> bool:
        thread = self._ledger.state.threads.threads.get(thread_id)
        return thread is not None and thread.status == "killed"

    def cancel_thread(self, thread_id: str) -> None:
        """Cancel every handler running for ``thread_id`` (its outcome is MessageDropped)."""
        for message_id, (task, delivery) in list(self.in_handler.items()):
            if delivery.thread_id == thread_id:
                self.killed.add(message_id)
                delivery.holding = None  # revoked: its holder's sends raise LeaseLostError
                task.cancel()

    async def worker(self, name: str, index: int) -> None:
        """Worker ``index`` of listener ``name``; it retires when the listener is removed or
        its concurrency drops to ``index`` or below."""

        def retire() -> bool:
            listener = self._listeners().get(name)
            return listener is None or index >= listener.concurrency

        holder = f"{self._process}/{name}.{index}"
        handled = 0
        while True:
            await self._ledger.wait_healthy()  # no dispatching while the log cannot be written
            handled += 1
            if handled % TURN == 0:
                # A handler that never suspends would otherwise let this loop drain the whole
                # mailbox in one turn of the event loop, with HTTP (and /health) waiting.
                await asyncio.sleep(0)
            mailbox = self.mailboxes.get(name)
            if mailbox is None:
                return
            delivery = await mailbox.get(retire=retire)
            if delivery is None:
                return
            try:
                # The log may have failed while this worker waited for the message.
                await self._ledger.wait_healthy()
                await self.deliver(name, delivery, holder)
            finally:
                mailbox.done(delivery)
                self._ledger.notify()

    async def _grant(self, listener: Listener, delivery: Delivery, holder: str
                     ) -> Lease | None:
        """Lease ``delivery`` to ``holder`` and record it (``MessageDelivered``), superseding
        the message's previous lease (a failed, parked or crashed attempt). None if the fold
        says another holder has it.

        On a log this pump is the only writer of, the lease is decided here and the handler
        may start at once: its sends and outcome follow the lease in the log. On a shared log
        another writer's claim may come first, so the holder waits until the fold has its
        lease (or another one: then it lost the race, and lets the message go)."""
        delivery.attempts += 1
        now = self._clock()
        previous = delivery.lease.lease_id if delivery.lease is not None else delivery.supersedes
        lease_id = f"{self._lease_prefix}{next(self._lease_numbers)}"
        deadline = now + listener.timeout
        state = self._ledger.state
        try:
            event = grant(state.scheduling, state.threads, message_id=delivery.message_id,
                          listener=listener.name, attempt=delivery.attempts, lease_id=lease_id,
                          holder=holder, at=now, deadline=deadline,
                          redelivery=delivery.redelivery, supersedes=previous)
        except LeaseLostError as exc:
            _log.warning("not delivering: %s", exc)
            return None
        committed = self._commit_soon([event])
        lease = Lease(message_id=delivery.message_id, attempt=delivery.attempts,
                      lease_id=lease_id, holder=holder, deadline=deadline, supersedes=previous)
        if not self._ledger.log.exclusive:
            try:
                await asyncio.shield(committed)
                check(state.scheduling, lease)
            except LeaseLostError as exc:
                _log.info("not delivering: %s", exc)
                return None
            except LogError:  # the claim was not recorded: try again once the log works
                delivery.attempts -= 1
                self._requeue(listener.name, delivery, closed=False)
                return None
        delivery.lease = delivery.holding = lease
        return lease

    async def deliver(self, name: str, delivery: Delivery, holder: str) -> None:
        # Outcome events are appended without waiting: the log keeps their order, the fold
        # applies them once durable, and a crash before that only means a redelivery.
        while True:
            listener = self._listeners().get(name)
            if listener is None:
                self._commit_soon(self._outcome(delivery.thread_id, [MessageDeadLettered(
                    at=self._clock(), message_id=delivery.message_id, listener=name,
                    reason=f"Listener {name!r} was removed from the organism.")]))
                return
            if self.thread_killed(delivery.thread_id):
                self._commit_soon([MessageDropped(at=self._clock(),
                                                  message_id=delivery.message_id,
                                                  thread_id=delivery.thread_id,
                                                  reason="thread killed")])
                return
            if delivery.schema_digest != listener.schema.digest and delivery.sender != "system":
                # The listener's schema changed (a reload) since this message was accepted.
                try:
                    listener.schema.validate(delivery.payload)
                except PayloadError as exc:
                    self._commit_soon(self._outcome(delivery.thread_id, [MessageDeadLettered(
                        at=self._clock(), message_id=delivery.message_id, listener=name,
                        reason=f"The message no longer fits {name}'s new schema: "
                               f"{exc.message}")]))
                    return
                delivery.schema_digest = listener.schema.digest
            lease = await self._grant(listener, delivery, holder)
            if lease is None:
                return
            attempt = lease.attempt
            started = time.perf_counter()
            error = await self.call(listener, delivery, lease)
            if error is Held.PARKED:
                self.parked.setdefault(delivery.thread_id, []).append((name, delivery))
                return
            if delivery.message_id in self.killed:
                self.killed.discard(delivery.message_id)
                self._commit_soon([MessageDropped(at=self._clock(),
                                                  message_id=delivery.message_id,
                                                  thread_id=delivery.thread_id,
                                                  reason="thread killed")])
                return
            if error is Held.REQUEUE:
                self._requeue(name, delivery, closed=False)
                return
            lease_id = lease.lease_id
            if error is None:
                self._close(name, delivery, [HandlerSucceeded(
                    at=self._clock(), message_id=delivery.message_id, listener=name,
                    duration_ms=(time.perf_counter() - started) * 1000, lease_id=lease_id)])
                return
            will_retry = attempt <= listener.retries.max
            events: list[Event] = [HandlerFailed(at=self._clock(), message_id=delivery.message_id,
                                                 listener=name, attempt=attempt, error=error,
                                                 will_retry=will_retry, lease_id=lease_id)]
            delay = listener.retries.backoff * (2 ** (attempt - 1))
            if will_retry:
                events.append(MessageRetried(at=self._clock(), message_id=delivery.message_id,
                                             listener=name, attempt=attempt + 1, delay=delay,
                                             lease_id=lease_id))
            else:
                events.append(MessageDeadLettered(at=self._clock(),
                                                  message_id=delivery.message_id,
                                                  listener=name, reason=error,
                                                  lease_id=lease_id))
                self._close(name, delivery, events)
                return
            self._commit_soon(events)
            await asyncio.sleep(delay)

    def _close(self, name: str, delivery: Delivery, events: list[Event]) -> None:
        """Record a message's outcome; if the log cannot take it, the message goes back to its
        mailbox, to be handled again once the log works (its earlier sends were not recorded
        either, or are reused: see ``Router.send``)."""
        future = self._commit_soon(self._outcome(delivery.thread_id, events))

        def settled(future: asyncio.Future[list[int]]) -> None:
            if future.cancelled() or future.exception() is not None:
                self._requeue(name, delivery, closed=True)

        future.add_done_callback(settled)

    def _requeue(self, name: str, delivery: Delivery, *, closed: bool) -> None:
        if closed:
            self._ledger.reopen(delivery.thread_id)
        mailbox = self.mailboxes.get(name)
        if mailbox is None:
            return
        delivery.redelivery = True
        mailbox.put(delivery, reserved=False)

    async def call(self, listener: Listener, delivery: Delivery, lease: Lease
                   ) -> str | Held | None:
        """Run the handler once under ``lease``; the error text if it failed, None if it
        succeeded (or was cancelled by a thread kill, which the caller checks), or why it is
        ``Held``. Once it returns, the lease is no longer held."""
        info = HandlerInfo(name=listener.name, peers=listener.peers,
                           message_id=delivery.message_id, thread=delivery.thread_id,
                           sender=delivery.sender, parent=delivery.parent_id,
                           redelivery=delivery.redelivery, attempt=lease.attempt,
                           deadline=lease.deadline)

        async def send(to: str, data: Payload) -> str | None:
            return await self._send(listener, delivery, lease, to, data)

        ctx = Context(info=info, send=send, logger=self._logger(listener.name))
        delivery.sends = 0
        handler = listener.handler_fn
        if handler is None and listener.agent is not None and self._agent is not None:
            handler = partial(self._agent, listener)
        if handler is None:
            return f"Listener {listener.name!r} has no handler."
        task = asyncio.current_task()
        assert task is not None
        self.in_handler[delivery.message_id] = (task, delivery)
        try:
            async with asyncio.timeout(listener.timeout):
                await handler(delivery.payload, ctx)
        except asyncio.CancelledError:
            if delivery.message_id not in self.killed:
                raise
            task.uncancel()
            return None
        except TimeoutError:
            return f"The handler timed out after {listener.timeout:g}s."
        except BudgetExhaustedError:
            return Held.PARKED  # BudgetExhausted is recorded; the thread waits for a raise
        except (BusyError, LogError):
            return Held.REQUEUE  # the log failed under the handler: handle it again later
        except Exception as exc:  # the handler's own failure, recorded with its text
            return f"{type(exc).__name__}: {exc}"
        finally:
            del self.in_handler[delivery.message_id]
            delivery.holding = None
        if delivery.message_id in self.killed and task.cancelling():
            task.uncancel()
        return None

    def _logger(self, name: str) -> logging.Logger:
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = logging.getLogger(f"xml_pipeline.listener.{name}")
        return logger


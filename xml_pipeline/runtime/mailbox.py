"""A listener's mailbox: bounded, pausable, ordered per thread.

Workers ``await get()`` the oldest message whose thread is not already being handled by
this listener (so one thread's messages reach a listener in the order they were accepted,
even with ``concurrency`` above one), and ``done()`` it afterwards. Producers first
``await reserve()`` a slot (waiting while the mailbox is full), or ``reserve_nowait()`` which
raises ``MailboxFullError``; only then is the message accepted into the log and ``put``.
A paused mailbox hands out nothing; its messages stay queued in order.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree

from xml_pipeline.errors import MailboxFullError
from xml_pipeline.runtime.signal import Signal
from xml_pipeline.state.scheduling import Lease

__all__ = ["Delivery", "Mailbox", "MailboxStatistics"]


@dataclass(slots=True, kw_only=True)
class Delivery:
    """One accepted message waiting for (or in) its handler."""

    message_id: str
    thread_id: str
    sender: str
    parent_id: str | None
    payload: etree._Element
    envelope: bytes
    redelivery: bool = False
    attempts: int = 0  # deliveries so far
    system_depth: int = 0  # SystemErrors in a row that led to this message
    schema_digest: str | None = None  # the target's schema when accepted (None: unknown)
    sends: int = 0  # messages sent by the current handler call
    prior_sends: list[str] | None = None  # what earlier calls sent (filled on redelivery)
    #: the lease of the current (or last) delivery; the next one supersedes it
    lease: Lease | None = None
    #: the lease while its handler call runs (None once it is over, or revoked)
    holding: Lease | None = None
    supersedes: str | None = None  # a lease recorded before this process (on recovery)


@dataclass(frozen=True, slots=True, kw_only=True)
class MailboxStatistics:
    queued: int
    in_flight: int
    capacity: int
    paused: bool


class Mailbox:
    def __init__(self, *, capacity: int = 1000) -> None:
        self.capacity = capacity
        self._queue: OrderedDict[str, Delivery] = OrderedDict()
        self._reserved = 0
        self._busy_threads: dict[str, int] = {}
        self._in_flight = 0
        self._paused = False
        self._closed = False
        self._signal = Signal()

    # -- producers

    def _has_room(self) -> bool:
        return len(self._queue) + self._reserved < self.capacity

    @property
    def full(self) -> bool:
        return not self._has_room()

    def reserve_nowait(self) -> None:
        if not self._has_room():
            raise self.full_error()
        self._reserved += 1

    def full_error(self) -> MailboxFullError:
        return MailboxFullError(
            f"The mailbox is full ({self.capacity} messages waiting); retry shortly.")

    async def reserve(self) -> None:
        while not self._has_room():
            if self._closed:
                raise MailboxFullError("The mailbox is closed.")
            await self._signal.wait()
        self._reserved += 1

    def release(self) -> None:
        """Give back a reserved slot that was not used."""
        self._reserved -= 1
        self._notify()

    def put(self, delivery: Delivery, *, reserved: bool = True) -> None:
        if reserved:
            self._reserved -= 1
        self._queue[delivery.message_id] = delivery
        self._notify()

    def _notify(self) -> None:
        # Wake every waiter; each re-checks its own condition against a fresh signal. An
        # event nobody waits on needs no replacing.
        self._signal.notify()

    # -- workers

    def _next(self) -> Delivery | None:
        if self._paused:
            return None
        for message_id, delivery in self._queue.items():
            if delivery.thread_id not in self._busy_threads:
                del self._queue[message_id]
                return delivery
        return None

    async def get(self, *, retire: Callable[[], bool] | None = None) -> Delivery | None:
        """The next deliverable message; marks its thread busy until ``done``. Returns None
        as soon as ``retire()`` is true (checked whenever the mailbox changes)."""
        while True:
            if retire is not None and retire():
                return None
            delivery = self._next()
            if delivery is not None:
                self._busy_threads[delivery.thread_id] = 1
                self._in_flight += 1
                self._notify()
                return delivery
            if self._closed:
                raise asyncio.CancelledError
            await self._signal.wait()

    def done(self, delivery: Delivery) -> None:
        self._busy_threads.pop(delivery.thread_id, None)
        self._in_flight -= 1
        self._notify()

    # -- control

    def wake(self) -> None:
        """Make every waiting worker look again (for instance at its ``retire`` condition)."""
        self._notify()

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._notify()

    @property
    def paused(self) -> bool:
        return self._paused

    def drop_thread(self, thread_id: str) -> list[Delivery]:
        """Remove and return every queued message of ``thread_id``."""
        dropped = [d for d in self._queue.values() if d.thread_id == thread_id]
        for delivery in dropped:
            del self._queue[delivery.message_id]
        self._notify()
        return dropped

    def drain(self) -> list[Delivery]:
        """Remove and return everything queued."""
        items = list(self._queue.values())
        self._queue.clear()
        self._notify()
        return items

    def close(self) -> None:
        self._closed = True
        self._notify()

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing deliverable queued (a paused mailbox may hold
        messages and still be idle)."""
        return not self._in_flight and not self._reserved and (self._paused or not self._queue)

    def statistics(self) -> MailboxStatistics:
        return MailboxStatistics(queued=len(self._queue), in_flight=self._in_flight,
                                 capacity=self.capacity, paused=self._paused)

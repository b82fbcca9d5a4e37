"""What folded events do to this process's queues, whoever appended them.

A control is decided from the fold and recorded; its effect here follows the fold of its
event, so that the same event appended by another writer of a shared log has the same effect:
``AgentPaused``/``AgentResumed`` pause and resume the listener's mailbox; ``ThreadKilled``
drops the thread's queued and parked messages (recorded as ``MessageDropped``) and cancels its
handlers; ``BudgetRaised`` puts the calls it frees back in their mailboxes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from xml_pipeline.events import (
    AgentPaused,
    AgentResumed,
    BudgetRaised,
    Event,
    MessageDropped,
    ThreadKilled,
)
from xml_pipeline.runtime.delivery import Deliverer
from xml_pipeline.runtime.ledger import Ledger
from xml_pipeline.runtime.mailbox import Mailbox
from xml_pipeline.state.budget_keys import ThreadAgentKey, parse_key
from xml_pipeline.types import Clock

__all__ = ["Effects"]


class Effects:
    def __init__(self, *, ledger: Ledger, clock: Clock, mailboxes: Mapping[str, Mailbox],
                 deliverer: Deliverer) -> None:
        self._ledger = ledger
        self._clock = clock
        self._mailboxes = mailboxes
        self._deliverer = deliverer
        #: thread id -> the commit of the drops its kill caused, until done
        self._dropping: dict[str, asyncio.Future[list[int]]] = {}

    def __call__(self, position: int, event: Event) -> None:
        if isinstance(event, AgentPaused | AgentResumed):
            mailbox = self._mailboxes.get(event.agent)
            if mailbox is not None:
                (mailbox.pause if isinstance(event, AgentPaused) else mailbox.resume)()
        elif isinstance(event, ThreadKilled):
            self._killed(event.thread_id)
        elif isinstance(event, BudgetRaised):
            self._raised(event)

    async def wait_dropped(self, thread_id: str) -> None:
        """Return once the drops a kill of ``thread_id`` caused are recorded."""
        dropping = self._dropping.get(thread_id)
        if dropping is not None:
            await asyncio.shield(dropping)

    def _killed(self, thread_id: str) -> None:
        self._ledger.closed(thread_id)
        now = self._clock()
        dropped: list[Event] = [
            MessageDropped(at=now, message_id=delivery.message_id, thread_id=thread_id,
                           reason="thread killed")
            for _, delivery in self._deliverer.parked.pop(thread_id, [])]
        for mailbox in self._mailboxes.values():
            for delivery in mailbox.drop_thread(thread_id):
                dropped.append(MessageDropped(at=now, message_id=delivery.message_id,
                                              thread_id=thread_id, reason="thread killed"))
        self._deliverer.cancel_thread(thread_id)
        if dropped:
            future = self._dropping[thread_id] = self._ledger.commit_soon(dropped)
            future.add_done_callback(lambda done: self._forget(thread_id, done))

    def _forget(self, thread_id: str, done: asyncio.Future[list[int]]) -> None:
        if self._dropping.get(thread_id) is done:
            del self._dropping[thread_id]

    def _raised(self, event: BudgetRaised) -> None:
        parked = self._deliverer.parked
        budget = parse_key(event.scope, event.key)
        threads = ([] if budget is None else [budget.thread_id]
                   if budget.thread_id is not None else list(parked))
        for thread_id in threads:
            waiting = parked.pop(thread_id, [])
            held = {n for n, _ in waiting if ThreadAgentKey(thread_id, n).key in event.held}
            still = [(n, d) for n, d in waiting if n in held]
            if still:
                parked[thread_id] = still
            for name, delivery in waiting:
                if name in held:
                    continue
                mailbox = self._mailboxes.get(name)
                if mailbox is not None:
                    delivery.attempts -= 1  # the refused call was not an attempt
                    mailbox.put(delivery, reserved=False)

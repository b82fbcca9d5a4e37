"""A start: what the pump records when it starts, and the messages it delivers again.

``start_events`` is ``OrganismStarted`` (and ``OrganismLoaded`` when the organism differs from
the one the log last recorded). ``recover`` finds every accepted message without a final
outcome and puts it back in its listener's mailbox, flagged as a redelivery when it may have
been seen (a retry, or a start after a crash), superseding any lease it still has from the run
before (that holder is gone); it returns the outcomes it decided instead (a killed thread's
messages are dropped, a removed listener's dead-lettered), for the caller to record.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from xml_pipeline.config import Organism
from xml_pipeline.envelope import LOGGED_LIMITS, parse_envelope
from xml_pipeline.events import (
    Event,
    MessageAccepted,
    MessageDeadLettered,
    MessageDropped,
    OrganismLoaded,
    OrganismStarted,
)
from xml_pipeline.log import EventLog
from xml_pipeline.runtime.mailbox import Delivery, Mailbox
from xml_pipeline.state import State
from xml_pipeline.state.threads import FINAL, MessageInfo
from xml_pipeline.version import __version__

__all__ = ["budgets_of", "delivery_of", "loaded_event", "recover", "start_events"]


def budgets_of(organism: Organism) -> dict[str, int | None]:
    budgets = organism.budgets
    return {"thread_tokens": budgets.thread_tokens, "agent_tokens": budgets.agent_tokens,
            "organism_tokens": budgets.organism_tokens}


def loaded_event(organism: Organism, *, at: float) -> OrganismLoaded:
    return OrganismLoaded(
        at=at, name=organism.name, digest=organism.digest, source=organism.source,
        budgets=budgets_of(organism), retention=organism.retention.summary(),
        listeners={name: listener.summary() for name, listener in organism.listeners.items()},
    )


def start_events(state: State, organism: Organism, *, at: float) -> list[Event]:
    events: list[Event] = [OrganismStarted(at=at, name=organism.name, digest=organism.digest,
                                           pid=os.getpid(), host=socket.gethostname(),
                                           version=__version__)]
    if state.agents.digest != organism.digest:
        events.append(loaded_event(organism, at=at))
    return events


async def recover(state: State, log: EventLog, mailboxes: Mapping[str, Mailbox], *,
                  clean_start: bool, at: float) -> list[Event]:
    """Put every pending message of ``state`` back in its mailbox; the outcomes to record
    for those that cannot go back. ``clean_start``: the log's last run stopped cleanly."""
    pending = {m.message_id: m for m in state.threads.messages.values()
               if m.status not in FINAL}
    if not pending:
        return []
    start = min(m.position for m in pending.values()) - 1
    found: dict[str, MessageAccepted] = {}
    async for record in log.read(after=start):
        event = record.event
        if isinstance(event, MessageAccepted) and event.message_id in pending:
            found[event.message_id] = event
        if len(found) == len(pending):
            break
    outcomes: list[Event] = []
    for info in sorted(pending.values(), key=lambda m: m.position):
        accepted = found.get(info.message_id)
        thread = state.threads.threads.get(info.thread_id)
        if accepted is None:
            continue
        if thread is not None and thread.status == "killed":
            outcomes.append(MessageDropped(at=at, message_id=info.message_id,
                                           thread_id=info.thread_id, reason="thread killed"))
            continue
        mailbox = mailboxes.get(info.to)
        if mailbox is None:
            outcomes.append(MessageDeadLettered(
                at=at, message_id=info.message_id, listener=info.to,
                reason=f"Listener {info.to!r} no longer exists in the organism."))
            continue
        lease = state.scheduling.leases.get(info.message_id)
        envelope = parse_envelope(accepted.envelope, limits=LOGGED_LIMITS)
        mailbox.put(Delivery(message_id=info.message_id, thread_id=info.thread_id,
                             sender=info.sender, parent_id=info.parent_id,
                             payload=envelope.payload,
                             envelope=accepted.envelope.encode("utf-8"),
                             redelivery=info.attempts > 0 or not clean_start,
                             attempts=info.attempts,
                             supersedes=None if lease is None else lease.lease_id),
                    reserved=False)
    return outcomes


async def delivery_of(log: EventLog, info: MessageInfo) -> Delivery | None:
    """A new delivery of the message ``info`` describes (a dead letter an operator retries),
    from its ``MessageAccepted`` in the log; None if the log no longer holds it."""
    async for record in log.read(after=info.position - 1):
        if not isinstance(record.event, MessageAccepted):
            return None
        envelope = record.event.envelope
        parsed = parse_envelope(envelope, limits=LOGGED_LIMITS)
        return Delivery(message_id=info.message_id, thread_id=info.thread_id,
                        sender=info.sender, parent_id=info.parent_id, payload=parsed.payload,
                        envelope=envelope.encode(), attempts=info.attempts)
    return None

"""Scheduling: which messages are leased, to whom, until when; and the lease decisions.

A delivery is a lease ``(message id, attempt, lease id, holder, deadline)``, recorded as
``MessageDelivered``. This projection is the fence: ``admit`` decides, for every delivery and
outcome event, whether the fold takes it, before any other projection sees it.

- A ``MessageDelivered`` is granted if its message is accepted, not final and not leased, or
  leased under the lease it ``supersedes`` (one that expired or whose holder is gone). Of two
  holders racing for one message, the first in the log wins, in every fold.
- An outcome (``HandlerSucceeded``, ``HandlerFailed``, and the ``MessageRetried`` or
  ``MessageDeadLettered`` that follows a failure) is taken only from the message's current
  lease. A late outcome, from a lease that expired, was revoked or superseded, changes nothing.
- The bus's own decisions (``MessageDropped`` for a killed thread, a dead letter with no lease,
  an operator's retry) always apply, and revoke whatever lease the message has.

The decision functions beside it (``grant``, ``check``) return events or raise
``LeaseLostError``; they read state and never the clock: the caller passes the time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import msgspec

from xml_pipeline.errors import LeaseLostError
from xml_pipeline.events import (
    Event,
    HandlerFailed,
    HandlerSucceeded,
    MessageDeadLettered,
    MessageDelivered,
    MessageDropped,
    MessageRetried,
)
from xml_pipeline.state.threads import FINAL, Threads

__all__ = ["FENCED", "Lease", "LeaseInfo", "Scheduling", "admit", "check", "grant"]

#: A lease id that version 1 records carry (before leases): granted and folded as then.
LEGACY = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """What a holder is given with a message: its proof of holding it."""

    message_id: str
    attempt: int
    lease_id: str
    holder: str
    deadline: float | None
    supersedes: str | None = None  # the lease it took over (while the fold still has that)


class LeaseInfo(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    lease_id: str
    holder: str
    listener: str
    attempt: int
    deadline: float | None = None


class Scheduling(msgspec.Struct, kw_only=True):
    #: message id -> its current lease
    leases: dict[str, LeaseInfo] = msgspec.field(default_factory=dict)


@singledispatch
def admit(event: Event, state: Scheduling, threads: Threads) -> bool:
    """Whether the fold takes ``event``; updates the leases it grants or ends. A refused
    event changes nothing at all (a lost race, a late holder's outcome)."""
    return True


@admit.register
def _(event: MessageDelivered, state: Scheduling, threads: Threads) -> bool:
    message = threads.messages.get(event.message_id)
    if message is None or message.status in FINAL:
        return False
    current = state.leases.get(event.message_id)
    if (current is not None and event.lease_id != LEGACY
            and current.lease_id != event.supersedes):
        return False  # held by another holder: this claim lost the race
    state.leases[event.message_id] = LeaseInfo(
        lease_id=event.lease_id, holder=event.holder, listener=event.listener,
        attempt=event.attempt, deadline=event.deadline)
    return True


def _from_current(event: HandlerSucceeded | HandlerFailed | MessageRetried
                  | MessageDeadLettered, state: Scheduling, *, ends: bool) -> bool:
    lease_id = event.lease_id
    current = state.leases.get(event.message_id)
    if lease_id != LEGACY and (current is None or current.lease_id != lease_id):
        return False
    if ends:
        state.leases.pop(event.message_id, None)
    return True


@admit.register
def _(event: HandlerSucceeded, state: Scheduling, threads: Threads) -> bool:
    return _from_current(event, state, ends=True)


@admit.register
def _(event: HandlerFailed, state: Scheduling, threads: Threads) -> bool:
    return _from_current(event, state, ends=False)


@admit.register
def _(event: MessageRetried, state: Scheduling, threads: Threads) -> bool:
    if event.lease_id is None:  # an operator's retry of a dead letter, or a version 1 record
        return _revoke(event.message_id, state)
    return _from_current(event, state, ends=True)


@admit.register
def _(event: MessageDeadLettered, state: Scheduling, threads: Threads) -> bool:
    if event.lease_id is None:  # the bus's decision: it revokes any lease
        return _revoke(event.message_id, state)
    return _from_current(event, state, ends=True)


@admit.register
def _(event: MessageDropped, state: Scheduling, threads: Threads) -> bool:
    return _revoke(event.message_id, state)


def _revoke(message_id: str, state: Scheduling) -> bool:
    state.leases.pop(message_id, None)
    return True


FENCED = frozenset(admit.registry) - {object}


# ------------------------------------------------------------------ decisions


def grant(state: Scheduling, threads: Threads, *, message_id: str, listener: str,
          attempt: int, lease_id: str, holder: str, at: float, deadline: float | None,
          redelivery: bool, supersedes: str | None = None) -> MessageDelivered:
    """The ``MessageDelivered`` that leases ``message_id`` to ``holder``. Raises
    ``LeaseLostError`` if the fold would refuse it (final, or held under another lease)."""
    message = threads.messages.get(message_id)
    if message is None or message.status in FINAL:
        raise LeaseLostError(f"Message {message_id} cannot be leased to {holder}: it is "
                             f"{'unknown' if message is None else message.status}.")
    current = state.leases.get(message_id)
    if current is not None and current.lease_id != supersedes:
        raise LeaseLostError(f"Message {message_id} cannot be leased to {holder}: "
                             f"{current.holder} holds it under lease {current.lease_id}.")
    return MessageDelivered(at=at, message_id=message_id, listener=listener, attempt=attempt,
                            redelivery=redelivery, lease_id=lease_id, holder=holder,
                            deadline=deadline, supersedes=supersedes)


def check(state: Scheduling, lease: Lease, *, pending: bool = False) -> None:
    """Raise ``LeaseLostError`` unless ``lease`` is its message's current lease. With
    ``pending``, a lease the fold has not seen yet (its event is still being appended) counts
    as current while the fold holds no lease or the one it supersedes."""
    current = state.leases.get(lease.message_id)
    if current is not None and current.lease_id == lease.lease_id:
        return
    if pending and (current is None or current.lease_id == lease.supersedes):
        return
    if current is None:
        raise LeaseLostError(
            f"Lease {lease.lease_id} on message {lease.message_id} is over: the message was "
            "settled, retried or dropped since; what its holder sends or reports now changes "
            "nothing.")
    raise LeaseLostError(
        f"Lease {lease.lease_id} on message {lease.message_id} was superseded: "
        f"{current.holder} holds it under lease {current.lease_id}; what the old holder "
        "sends or reports changes nothing.")

"""Threads and messages: a pure fold over the log.

Every accepted message belongs to a thread; its status moves from ``pending`` through
``delivered`` to one final outcome (``handled``, ``dead``, ``dropped``). A thread is
``active`` while any of its messages lacks a final outcome, ``completed`` or ``failed``
(some message dead-lettered) once the pump records ``ThreadCompleted``, ``killed`` after
``ThreadKilled`` and ``paused`` while its token budget is exhausted.
Events about messages this projection never saw accepted are ignored, so any sequence folds.

Memory follows live work, not history: an ended thread keeps only its summary, and only the
newest ``organism.retention.ended_threads`` ended threads are kept at all (killed threads, and
threads holding dead letters, are kept until those are resolved); only the newest
``retention.idempotency_keys`` keys are remembered. Both limits come from the organism events
in the log, so a replay forgets exactly what the live state forgot. The log keeps everything.
"""

from __future__ import annotations

from functools import singledispatch

import msgspec

from xml_pipeline.config import RESERVED_SENDERS
from xml_pipeline.events import (
    BudgetExhausted,
    BudgetRaised,
    Event,
    HandlerFailed,
    HandlerSucceeded,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    MessageDropped,
    MessageRejected,
    MessageRetried,
    OrganismLoaded,
    OrganismReloaded,
    ThreadCompleted,
    ThreadKilled,
)
from xml_pipeline.state.budget_keys import ThreadAgentKey, parse_key

__all__ = [
    "FINAL", "KEEP_ENDED", "KEEP_KEYS", "MessageInfo", "ThreadInfo", "Threads", "evolve", "kill",
]

#: Defaults of ``organism.retention`` (for logs whose organism events do not say).
KEEP_ENDED = 10_000
KEEP_KEYS = 100_000

#: Message statuses after which nothing more happens to a message (unless an operator retries).
#: "outbound" marks a message addressed outside the organism (a reply to an API client).
FINAL = frozenset({"handled", "dead", "dropped", "outbound"})


class MessageInfo(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    message_id: str
    thread_id: str
    parent_id: str | None
    sender: str
    to: str
    payload_type: str
    accepted_at: float
    position: int
    status: str = "pending"  # pending | delivered | handled | dead | dropped
    attempts: int = 0
    error: str | None = None


class ThreadInfo(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    thread_id: str
    created_at: float
    updated_at: float
    root_message_id: str
    status: str = "active"  # active | completed | failed | killed | paused
    message_count: int = 0
    open_count: int = 0  # messages without a final outcome
    dead_count: int = 0
    rejected_count: int = 0
    participants: list[str] = msgspec.field(default_factory=list)
    #: ids of the messages still held in ``Threads.messages`` (cleared once the thread ends)
    messages: list[str] = msgspec.field(default_factory=list)
    #: log position of every message accepted into the thread, in order (the history)
    positions: list[int] = msgspec.field(default_factory=list)
    killed_by: str | None = None


class Threads(msgspec.Struct, kw_only=True):
    threads: dict[str, ThreadInfo] = msgspec.field(default_factory=dict)
    messages: dict[str, MessageInfo] = msgspec.field(default_factory=dict)
    #: idempotency key -> (message id, thread id) of the first message accepted with it
    idempotency: dict[str, tuple[str, str]] = msgspec.field(default_factory=dict)
    #: message id -> reason, for messages currently dead-lettered
    dead_letters: dict[str, str] = msgspec.field(default_factory=dict)
    rejected: int = 0
    accepted: int = 0
    #: (thread id, its message count then) for each thread that ended, oldest first
    ended: list[tuple[str, int]] = msgspec.field(default_factory=list)
    keep_ended: int = KEEP_ENDED
    keep_keys: int = KEEP_KEYS
    forgotten: int = 0  # ended threads no longer kept
    #: threads forgotten by the event being folded, for the other projections to forget too
    #: (emptied by ``State.apply`` after each event, so always empty in a snapshot)
    just_forgotten: list[str] = msgspec.field(default_factory=list)


@singledispatch
def evolve(event: Event, state: Threads, position: int) -> Threads:
    return state


def _touch(state: Threads, thread_id: str, at: float) -> ThreadInfo | None:
    thread = state.threads.get(thread_id)
    if thread is not None:
        thread.updated_at = at
    return thread


def _forget_finished(state: Threads, thread: ThreadInfo) -> None:
    """Keep memory (and snapshots) proportional to live work: a thread that has ended keeps
    its summary and the log positions of its messages; the per-message records go, except
    dead letters, which stay until retried."""
    kept = []
    for message_id in thread.messages:
        message = state.messages.get(message_id)
        if message is None:
            continue
        if message.status in FINAL and message.status != "dead":
            del state.messages[message_id]
        else:
            kept.append(message_id)
    thread.messages = kept


def _slack(keep: int) -> int:
    """How far past its limit a collection may grow before it is trimmed (trimming in batches
    keeps the cost per event constant)."""
    return max(16, keep // 8)


def _ended(state: Threads, thread: ThreadInfo) -> None:
    """Remember that ``thread`` ended; forget the oldest ended threads beyond the limit."""
    state.ended.append((thread.thread_id, thread.message_count))
    if len(state.ended) <= state.keep_ended + _slack(state.keep_ended):
        return
    cut = len(state.ended) - state.keep_ended
    for thread_id, count in state.ended[:cut]:
        old = state.threads.get(thread_id)
        # Skip a thread that went on after this entry (a later entry covers it), a killed
        # thread (it must keep refusing messages) and one holding dead letters.
        if (old is not None and old.message_count == count and not old.messages
                and old.status in ("completed", "failed")):
            del state.threads[thread_id]
            state.forgotten += 1
            state.just_forgotten.append(thread_id)
    del state.ended[:cut]


def _remember_key(state: Threads, key: str, ids: tuple[str, str]) -> None:
    keys = state.idempotency
    if key in keys:
        return
    keys[key] = ids
    if len(keys) > state.keep_keys + _slack(state.keep_keys):
        kept = list(keys.items())[len(keys) - state.keep_keys:] if state.keep_keys else []
        state.idempotency = dict(kept)


def _retain(state: Threads, retention: dict[str, int]) -> None:
    # The loader allows 0 and up; a log written otherwise still folds the same everywhere.
    state.keep_ended = max(0, retention.get("ended_threads", KEEP_ENDED))
    state.keep_keys = max(0, retention.get("idempotency_keys", KEEP_KEYS))


def _close(state: Threads, message: MessageInfo, status: str, at: float) -> None:
    was_open = message.status not in FINAL
    message.status = status
    thread = _touch(state, message.thread_id, at)
    if thread is not None and was_open:
        thread.open_count -= 1
        if thread.status == "killed" and thread.open_count == 0:
            _forget_finished(state, thread)


@evolve.register
def _(event: OrganismLoaded, state: Threads, position: int) -> Threads:
    _retain(state, event.retention)
    return state


@evolve.register
def _(event: OrganismReloaded, state: Threads, position: int) -> Threads:
    _retain(state, event.retention)
    return state


@evolve.register
def _(event: MessageAccepted, state: Threads, position: int) -> Threads:
    if event.message_id in state.messages:
        return state
    state.accepted += 1
    thread = state.threads.get(event.thread_id)
    if thread is None:
        thread = ThreadInfo(thread_id=event.thread_id, created_at=event.at, updated_at=event.at,
                            root_message_id=event.message_id)
        state.threads[event.thread_id] = thread
    thread.updated_at = event.at
    thread.message_count += 1
    thread.messages.append(event.message_id)
    thread.positions.append(position)
    outbound = event.to in RESERVED_SENDERS
    if not outbound:
        thread.open_count += 1
    if thread.status in ("completed", "failed"):
        thread.status = "active"
    for name in (event.sender, event.to):
        if name not in thread.participants:
            thread.participants.append(name)
    state.messages[event.message_id] = MessageInfo(
        message_id=event.message_id, thread_id=event.thread_id, parent_id=event.parent_id,
        sender=event.sender, to=event.to, payload_type=event.payload_type,
        accepted_at=event.at, position=position, status="outbound" if outbound else "pending",
    )
    if event.idempotency_key is not None:
        _remember_key(state, event.idempotency_key, (event.message_id, event.thread_id))
    return state


@evolve.register
def _(event: MessageRejected, state: Threads, position: int) -> Threads:
    state.rejected += 1
    if event.thread_id is not None:
        thread = _touch(state, event.thread_id, event.at)
        if thread is not None:
            thread.rejected_count += 1
    return state


@evolve.register
def _(event: MessageDelivered, state: Threads, position: int) -> Threads:
    message = state.messages.get(event.message_id)
    if message is not None and message.status not in FINAL:
        message.status = "delivered"
        message.attempts = event.attempt
        _touch(state, message.thread_id, event.at)
    return state


@evolve.register
def _(event: HandlerSucceeded, state: Threads, position: int) -> Threads:
    message = state.messages.get(event.message_id)
    if message is not None and message.status not in FINAL:
        message.error = None
        _close(state, message, "handled", event.at)
    return state


@evolve.register
def _(event: HandlerFailed, state: Threads, position: int) -> Threads:
    message = state.messages.get(event.message_id)
    if message is not None and message.status not in FINAL:
        message.error = event.error
        message.attempts = event.attempt
        _touch(state, message.thread_id, event.at)
    return state


@evolve.register
def _(event: MessageRetried, state: Threads, position: int) -> Threads:
    message = state.messages.get(event.message_id)
    if message is None:
        return state
    if message.status == "dead":
        state.dead_letters.pop(message.message_id, None)
        thread = state.threads.get(message.thread_id)
        if thread is not None:
            thread.open_count += 1
            thread.dead_count -= 1
            if thread.status in ("completed", "failed"):
                thread.status = "active"
    if message.status not in ("handled", "dropped"):
        message.status = "pending"
    _touch(state, message.thread_id, event.at)
    return state


@evolve.register
def _(event: MessageDeadLettered, state: Threads, position: int) -> Threads:
    message = state.messages.get(event.message_id)
    if message is not None and message.status not in FINAL:
        message.error = event.reason
        _close(state, message, "dead", event.at)
        state.dead_letters[message.message_id] = event.reason
        thread = state.threads.get(message.thread_id)
        if thread is not None:
            thread.dead_count += 1
    return state


@evolve.register
def _(event: MessageDropped, state: Threads, position: int) -> Threads:
    message = state.messages.get(event.message_id)
    if message is not None and message.status not in FINAL:
        message.error = event.reason
        _close(state, message, "dropped", event.at)
    return state


@evolve.register
def _(event: ThreadKilled, state: Threads, position: int) -> Threads:
    thread = _touch(state, event.thread_id, event.at)
    if thread is not None:
        thread.status = "killed"
        thread.killed_by = event.by
        if thread.open_count == 0:
            _forget_finished(state, thread)
    return state


@evolve.register
def _(event: ThreadCompleted, state: Threads, position: int) -> Threads:
    thread = _touch(state, event.thread_id, event.at)
    if thread is not None and thread.status == "active" and thread.open_count == 0:
        thread.status = "failed" if thread.dead_count else "completed"
        _forget_finished(state, thread)
        _ended(state, thread)
    return state


@evolve.register
def _(event: BudgetExhausted, state: Threads, position: int) -> Threads:
    thread = _touch(state, event.thread_id, event.at)
    if thread is not None and thread.status == "active":
        thread.status = "paused"
    return state


@evolve.register
def _(event: BudgetRaised, state: Threads, position: int) -> Threads:
    budget = parse_key(event.scope, event.key)
    if budget is None:
        return state  # names no budget (a hand-written record): it frees nothing
    held = {call.thread_id for call in map(ThreadAgentKey.parse, event.held)
            if call is not None}  # still paused by some budget
    if budget.thread_id is not None:
        thread_id = budget.thread_id
        thread = _touch(state, thread_id, event.at)
        if thread is not None and thread.status == "paused" and thread_id not in held:
            thread.status = "active"
    else:  # an agent or organism budget: every thread it paused may go on
        for thread_id, thread in state.threads.items():
            if thread.status == "paused" and thread_id not in held:
                thread.status = "active"
    return state


# ------------------------------------------------------------------ decisions


def kill(state: Threads, thread_id: str, *, at: float, by: str, reason: str = ""
         ) -> ThreadKilled | None:
    """The event that kills ``thread_id``, or None if it was killed already. Raises
    ``KeyError`` for a thread the state does not know."""
    thread = state.threads[thread_id]
    if thread.status == "killed":
        return None
    return ThreadKilled(at=at, thread_id=thread_id, by=by, reason=reason)

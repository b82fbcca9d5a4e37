"""The event catalogue: every fact the log can hold.

Events are frozen, slotted, keyword-only dataclasses with past-tense names. They carry data
only; ``at`` (seconds since the epoch) comes from an injected clock. ``CATALOGUE`` names them
all; the stored form is the mapper's (``events.mapper``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AgentPaused",
    "AgentResumed",
    "BudgetExhausted",
    "BudgetRaised",
    "BudgetWarned",
    "CATALOGUE",
    "Event",
    "HandlerFailed",
    "HandlerSucceeded",
    "LogRepaired",
    "MessageAccepted",
    "MessageDeadLettered",
    "MessageDelivered",
    "MessageDropped",
    "MessageRejected",
    "MessageRetried",
    "ModelResponded",
    "OrganismLoaded",
    "OrganismReloaded",
    "OrganismStarted",
    "OrganismStopped",
    "ReloadRejected",
    "ThreadCompleted",
    "ThreadKilled",
    "TokensReserved",
    "TokensUsed",
    "UsageReset",
]



@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event. ``at`` is when it happened, from the injected clock."""

    at: float


# ------------------------------------------------------------------ the organism's life


@dataclass(frozen=True, slots=True, kw_only=True)
class OrganismStarted(Event):
    name: str
    digest: str
    pid: int
    host: str
    version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrganismLoaded(Event):
    """The organism in force from here on: its YAML and every listener's settings."""

    name: str
    digest: str
    source: str
    budgets: dict[str, int | None]
    listeners: dict[str, dict[str, Any]]
    #: how much finished work the state keeps ("ended_threads", "idempotency_keys")
    retention: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class OrganismReloaded(Event):
    name: str
    digest: str
    source: str
    budgets: dict[str, int | None]
    listeners: dict[str, dict[str, Any]]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    updated: tuple[str, ...]
    #: listener -> the settings that changed ("payload", "peers", "handler_code", ...)
    changes: dict[str, list[str]] = field(default_factory=dict)
    retention: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadRejected(Event):
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OrganismStopped(Event):
    reason: str


# ------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageAccepted(Event):
    """A valid envelope, now durable; ``envelope`` is its exact text as delivered."""

    message_id: str
    thread_id: str
    parent_id: str | None
    sender: str
    to: str
    payload_type: str
    envelope: str
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRejected(Event):
    """Input the bus refused, with the (capped) raw text and the reason."""

    reason: str  # a stable code, e.g. "invalid_payload"
    error: str  # the sentence given to the sender
    raw: str
    sender: str | None = None
    to: str | None = None
    thread_id: str | None = None
    parent_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDelivered(Event):
    """A lease: ``holder`` may handle the message until ``deadline`` (seconds since the
    epoch, None: no deadline). It is granted in the fold only if the message is not final and
    not leased, or its current lease is ``supersedes`` (one that expired or whose holder is
    gone): of two holders racing for one message, the first in the log wins. An empty
    ``lease_id`` is a record from before leases (version 1), granted as it was then."""

    message_id: str
    listener: str
    attempt: int
    redelivery: bool = False
    lease_id: str = ""
    holder: str = ""
    deadline: float | None = None
    supersedes: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerSucceeded(Event):
    """The outcome of lease ``lease_id``; folded only while that is the message's lease."""

    message_id: str
    listener: str
    duration_ms: float
    lease_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerFailed(Event):
    """A failed attempt under lease ``lease_id``; folded only while that is the message's
    lease, which it keeps until the ``MessageRetried`` or ``MessageDeadLettered`` after it."""

    message_id: str
    listener: str
    attempt: int
    error: str
    will_retry: bool
    lease_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRetried(Event):
    """A failed or dead-lettered message is scheduled again (``by`` an operator, or the policy).
    The policy's retry names the lease whose failure it follows and ends it; an operator's
    (``lease_id`` None) applies to a message that holds no lease."""

    message_id: str
    listener: str
    attempt: int
    delay: float
    by: str | None = None
    lease_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDeadLettered(Event):
    """After the last failed attempt (``lease_id``: that attempt's lease, which it ends), or
    decided by the bus (``lease_id`` None: a removed listener, a schema that no longer fits),
    which revokes any lease on the message."""

    message_id: str
    listener: str
    reason: str
    lease_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDropped(Event):
    """An accepted message that will not be delivered (its thread was killed, for instance)."""

    message_id: str
    thread_id: str
    reason: str


# ------------------------------------------------------------------ agents and threads


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentPaused(Event):
    agent: str
    by: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentResumed(Event):
    agent: str
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadKilled(Event):
    thread_id: str
    by: str
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadCompleted(Event):
    thread_id: str


# ------------------------------------------------------------------ tokens and budgets


@dataclass(frozen=True, slots=True, kw_only=True)
class TokensReserved(Event):
    reservation_id: str
    thread_id: str
    agent: str
    model: str
    tokens: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TokensUsed(Event):
    thread_id: str
    agent: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost: float = 0.0
    latency_ms: float = 0.0
    reservation_id: str | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetExhausted(Event):
    """A call of ``agent`` in ``thread_id`` was not made because it would exceed the budget
    of ``scope`` (``key``): ``used`` (used and reserved) plus ``requested`` is over ``limit``.
    The call waits, and its thread is paused, until a raise lets it go on."""

    scope: str  # "thread" | "thread-agent" | "agent" | "organism"
    key: str  # the thread id, "<thread id>|<agent>", the agent, the organism's name
    thread_id: str
    agent: str
    limit: int
    used: int
    requested: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetRaised(Event):
    """The limit of the ``scope`` budget (``key``, as in ``BudgetExhausted``) is now
    ``max_tokens``. The waiting calls it covers go on (those of thread ``key`` for a thread
    or thread-agent budget; every one for an agent or organism budget), except those in
    ``held``: ``"<thread id>|<agent>"`` of calls that some budget still holds, whose threads
    stay paused. (Records written before ``held`` existed free every call they cover.)"""

    scope: str
    key: str
    max_tokens: int
    by: str
    held: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelResponded(Event):
    """The full text of an LLM answer, so that a replay or redelivery never calls again.
    ``key`` is ``<message id>#<step>`` (step 0 is the first call, then each correction)."""

    key: str
    message_id: str
    thread_id: str
    agent: str
    model: str
    text: str
    stop_reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetWarned(Event):
    """A budget crossed 75, 90 or 95 percent."""

    scope: str
    key: str
    percent: int
    used: int
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageReset(Event):
    by: str


# ------------------------------------------------------------------ the log itself


@dataclass(frozen=True, slots=True, kw_only=True)
class LogRepaired(Event):
    """``xml-pipeline repair`` moved damaged parts of the log aside, into ``folder`` (relative
    to the log directory), where they are kept. ``cut_at`` is the first position no longer in
    the log (this event takes it), or 0 if no record was cut (only bytes that held no record,
    or snapshots that the log contradicts); ``moved`` says what went where and ``problems``
    what the check found."""

    cut_at: int
    folder: str
    moved: tuple[str, ...]
    problems: tuple[str, ...]


# ------------------------------------------------------------------ the mapper

#: Every event type by its stored name, with its current version.
CATALOGUE: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        OrganismStarted, OrganismLoaded, OrganismReloaded, ReloadRejected, OrganismStopped,
        MessageAccepted, MessageRejected, MessageDelivered, HandlerSucceeded, HandlerFailed,
        MessageRetried, MessageDeadLettered, MessageDropped, AgentPaused, AgentResumed,
        ThreadKilled, ThreadCompleted, TokensReserved, TokensUsed, ModelResponded,
        BudgetExhausted, BudgetWarned, BudgetRaised, UsageReset, LogRepaired,
    )
}

"""What a client follows: a checked ``Subscription`` and the ``Filter`` that applies it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xml_pipeline.api.responses import ApiError
from xml_pipeline.events import CATALOGUE, Event
from xml_pipeline.runtime.pump import Pump

__all__ = ["Filter", "Subscription", "as_position", "subscription"]

_AGENT_FIELDS = ("listener", "agent", "sender", "to")


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """What a client follows: records after ``after`` that pass every filter given."""

    after: int
    thread: str | None = None
    agent: str | None = None
    types: frozenset[str] | None = None

    def describe(self) -> dict[str, Any]:
        return {"after": self.after, "thread": self.thread, "agent": self.agent,
                "types": None if self.types is None else sorted(self.types)}


def subscription(pump: Pump, *, after: object = None, thread: object = None,
                 agent: object = None, types: object = None) -> Subscription:
    """A checked subscription; ``after`` None means the current end of the log.

    Raises ``ApiError("invalid_request")`` naming the option, the value and what is allowed."""
    last = pump.log.last_position
    position = last if after is None else as_position(after)
    if position is None or position > last:
        raise ApiError("invalid_request",
                       f"'after' must be a log position, a whole number from 0 to {last}, not "
                       f"{after!r}.", details={"parameter": "after", "last_position": last})
    names: frozenset[str] | None = None
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ApiError("invalid_request", f"'types' must be a list of event type names, "
                                              f"not {types!r}.", details={"parameter": "types"})
        names = frozenset(t.strip() for t in types)
        unknown = sorted(names - CATALOGUE.keys())
        if unknown:
            raise ApiError("invalid_request",
                           f"Unknown event type {', '.join(map(repr, unknown))}; "
                           "details.valid_types lists the types there are.",
                           details={"parameter": "type", "unknown": unknown,
                                    "valid_types": sorted(CATALOGUE)})
    return Subscription(after=position, thread=_name("thread", thread),
                        agent=_name("agent", agent), types=names)


def _name(option: str, value: object) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise ApiError("invalid_request", f"{option!r} must be a non-empty string, not {value!r}.",
                   details={"parameter": option})


def as_position(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


class Filter:
    """Decides which events a subscription sees. For a thread filter it remembers the ids of
    the thread's messages, since delivery and handler events name only the message."""

    def __init__(self, pump: Pump, wanted: Subscription) -> None:
        self._pump = pump
        self._wanted = wanted
        self._messages: set[str] = set()
        if wanted.thread is not None:
            self._messages = {message_id for message_id, info
                              in pump.state.threads.messages.items()
                              if info.thread_id == wanted.thread}

    def __call__(self, event: Event) -> bool:
        wanted = self._wanted
        # The thread comes first: its message ids must be learnt from every event.
        if wanted.thread is not None and not self._in_thread(event, wanted.thread):
            return False
        if wanted.types is not None and type(event).__name__ not in wanted.types:
            return False
        return wanted.agent is None or any(getattr(event, name, None) == wanted.agent
                                           for name in _AGENT_FIELDS)

    def _in_thread(self, event: Event, thread: str) -> bool:
        thread_id = getattr(event, "thread_id", None)
        message_id = getattr(event, "message_id", None)
        if thread_id is None and message_id is not None:
            info = self._pump.state.threads.messages.get(message_id)
            thread_id = thread if message_id in self._messages else info and info.thread_id
        if thread_id == thread and message_id is not None:
            self._messages.add(message_id)
        return bool(thread_id == thread)

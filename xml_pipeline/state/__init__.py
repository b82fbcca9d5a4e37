"""State is a fold over the log: threads, agents, budgets and usage.

``State.apply(position, event)`` is the one function both the live pump and a replay call;
it does no I/O and reads no clock. ``project`` folds records, ``replay`` folds a whole log
(after a state to start from) and ``State.digest()`` fingerprints the state, so that live and
replayed states can be compared exactly.

A snapshot is ``State.encode()``, kept by the log (``EventLog.snapshots``), which uses it
only while it holds the record the state includes; ``restore`` decodes the newest one. It is
an optimisation only: replaying the rest of the log after it gives the state a replay from
position 0 gives.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec

from xml_pipeline.events import CATALOGUE, Event, Recorded
from xml_pipeline.log import EventLog
from xml_pipeline.state import agents, budgets, threads
from xml_pipeline.state.agents import Agents
from xml_pipeline.state.budgets import Budgets
from xml_pipeline.state.scheduling import FENCED, Scheduling, admit
from xml_pipeline.state.threads import Threads

__all__ = ["State", "project", "replay", "restore"]

_PROJECTIONS: tuple[tuple[str, Any], ...] = (
    ("agents", agents.evolve),
    ("threads", threads.evolve),
    ("budgets", budgets.evolve),
)
_Step = Callable[[Any, Any, int], Any]
_TABLE: dict[type[Event], tuple[tuple[str, _Step], ...]] = {}


def _steps(cls: type[Event]) -> tuple[tuple[str, _Step], ...]:
    steps = _TABLE.get(cls)
    if steps is None:
        if cls.__name__ not in CATALOGUE or CATALOGUE[cls.__name__] is not cls:
            raise TypeError(f"{cls.__name__} is not in the event catalogue; it cannot be folded.")
        steps = tuple(
            (attr, fn.dispatch(cls)) for attr, fn in _PROJECTIONS
            if fn.dispatch(cls) is not fn.dispatch(Event)
        )
        _TABLE[cls] = steps
    return steps


class State(msgspec.Struct, kw_only=True):
    """Every projection, and the position of the last event folded into it."""

    position: int = 0
    agents: Agents = msgspec.field(default_factory=Agents)
    threads: Threads = msgspec.field(default_factory=Threads)
    budgets: Budgets = msgspec.field(default_factory=Budgets)
    scheduling: Scheduling = msgspec.field(default_factory=Scheduling)

    def apply(self, position: int, event: Event) -> None:
        """Fold one event. Positions must increase; an unknown event type raises TypeError.
        A delivery or outcome the lease fence refuses (``scheduling.admit``) changes nothing
        but the count of refusals."""
        if position <= self.position:
            raise ValueError(f"Event at position {position} is not after {self.position}.")
        cls = type(event)
        if cls in FENCED and not admit(event, self.scheduling, self.threads):
            self.position = position
            return
        for attr, step in _TABLE.get(cls) or _steps(cls):
            step(event, getattr(self, attr), position)
        forgotten = self.threads.just_forgotten
        if forgotten:  # retention: what the threads forgot, the budgets forget too
            budgets.forget_threads(self.budgets, forgotten)
            forgotten.clear()
        self.position = position

    def encode(self) -> bytes:
        """The state as JSON, every mapping in insertion order: the order in which the oldest
        idempotency keys are forgotten is part of the state, so a snapshot keeps it."""
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> State:
        with _no_gc():
            return msgspec.json.decode(data, type=cls)

    def digest(self) -> str:
        """A fingerprint of the whole state (equal states have equal digests)."""
        return hashlib.sha256(msgspec.json.encode(self, order="sorted")).hexdigest()


def project(records: Iterable[Recorded], state: State | None = None) -> State:
    """Fold ``records`` into ``state`` (a new one by default)."""
    result = state if state is not None else State()
    apply = result.apply
    for record in records:
        apply(record.position, record.event)
    return result


async def restore(log: EventLog, *, upto: int | None = None) -> State | None:
    """The state of the newest snapshot of ``log`` (not past ``upto``) that decodes to a state
    of its position, or None: replay from position 0 then. A snapshot this build cannot decode
    (written by another version, say) is passed over for an older one."""
    while (found := await log.snapshots.latest(upto=upto)) is not None:
        position, data = found
        try:
            state = State.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            state = None
        if state is not None and state.position == position:
            return state
        upto = position - 1
    return None


async def replay(log: EventLog, *, state: State | None = None) -> State:
    """Fold every record of ``log`` after ``state.position`` into ``state``."""
    result = state if state is not None else State()
    apply = result.apply
    with _no_gc():
        async for record in log.read(after=result.position):
            apply(record.position, record.event)
    return result


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many acyclic objects (a replay, a
    snapshot decode): it would otherwise walk them again and again, for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()

"""State is a fold over the log: threads, agents, budgets and usage.

``State.apply(position, event)`` is the one function both the live pump and a replay call;
it does no I/O and reads no clock. ``project`` folds records, ``replay`` folds a whole log
(starting from a snapshot when a valid one exists) and ``State.digest()`` fingerprints the
state, so that live and replayed states can be compared exactly.

Snapshots are an optimisation only: each stores the position it includes and that record's
chain hash (its anchor, ``log.anchors``), and is ignored unless the log still holds that very
record. They are also witnesses of the log's history: opening a log whose record contradicts
a snapshot's anchor, or that lacks it, is refused (``log.integrity``).
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from xml_pipeline.events import CATALOGUE, Event, Recorded
from xml_pipeline.log import EventLog
from xml_pipeline.log.anchors import ANCHOR_VERSION, SNAPSHOTS, Anchor
from xml_pipeline.log.segments import hash_at, locate_record
from xml_pipeline.state import agents, budgets, threads
from xml_pipeline.state.agents import Agents
from xml_pipeline.state.budgets import Budgets
from xml_pipeline.state.scheduling import FENCED, Scheduling, admit
from xml_pipeline.state.threads import Threads

__all__ = [
    "State",
    "latest_snapshot",
    "project",
    "replay",
    "save_snapshot",
    "write_snapshot",
]

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


# ------------------------------------------------------------------ snapshots

_SNAPSHOT_DIR = SNAPSHOTS
_SNAPSHOT_VERSION = ANCHOR_VERSION


class _Snapshot(Anchor):
    """A snapshot file: its anchor (what the log must still hold for the snapshot to apply,
    checked by every open of the log), then the encoded state."""

    state: msgspec.Raw


def save_snapshot(log_directory: Path, state: State, *, keep: int = 2) -> Path | None:
    """Write ``state`` as a snapshot of the file log in ``log_directory`` (atomically), keeping
    the newest ``keep`` snapshots. Returns None if the log lacks the state's last record."""
    return write_snapshot(log_directory, state.position, state.encode(), keep=keep)


def write_snapshot(log_directory: Path, position: int, state: bytes, *, keep: int = 2,
                   location: tuple[str, int, bytes] | None = None) -> Path | None:
    """``save_snapshot`` for a state already encoded (``State.encode()`` of a state at
    ``position``), so that the caller can encode it where the state is consistent and do the
    file work elsewhere (a worker thread). Reads the log's files, writes, fsyncs and renames;
    raises ``OSError``. Returns None, writing nothing, if the log lacks the record at
    ``position``. Given the record's ``location`` (``FileLog.location``), it does not read
    the log to find it."""
    if location is None:
        location = locate_record(log_directory, position)
    if location is None:
        return None
    segment, offset, digest = location
    folder = log_directory / _SNAPSHOT_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"{position:020d}.snapshot"
    data = msgspec.json.encode(_Snapshot(version=_SNAPSHOT_VERSION, position=position,
                                         segment=segment, offset=offset,
                                         chain_hash=digest.hex(), state=msgspec.Raw(state)))
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    for old in sorted(folder.glob("*.snapshot"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def latest_snapshot(log_directory: Path, *, upto: int | None = None,
                    log: object | None = None) -> State | None:
    """The newest snapshot that still matches the log (and is not past ``upto``), or None.
    Given the open ``log`` (a file log), it also tells it where the snapshot's record is, so
    that replaying the rest starts there."""
    folder = log_directory / _SNAPSHOT_DIR
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.snapshot"), reverse=True):
        try:
            snapshot = msgspec.json.decode(path.read_bytes(), type=_Snapshot)
            if snapshot.version != _SNAPSHOT_VERSION:
                continue
            if upto is not None and snapshot.position > upto:
                continue
            digest = hash_at(log_directory, snapshot.segment, snapshot.offset,
                             snapshot.position)
            if digest is None or digest.hex() != snapshot.chain_hash:
                continue
            state = State.decode(bytes(snapshot.state))
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        if state.position == snapshot.position:
            hint = getattr(log, "seek_hint", None)
            if hint is not None:
                hint(snapshot.position, snapshot.segment, snapshot.offset)
            return state
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

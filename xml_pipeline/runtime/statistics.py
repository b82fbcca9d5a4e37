"""What a running pump reports about itself: one frozen value, taken at once.

``Pump.statistics()`` returns a ``PumpStatistics``; ``/metrics`` and the API serialise it as it
is, instead of reading the pump's mailboxes and projections one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

from xml_pipeline.log import LogStatistics

__all__ = ["ListenerStatistics", "PumpStatistics"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerStatistics:
    """One listener: its mailbox now, and its counters from the fold."""

    name: str
    status: str  # running | paused
    queued: int  # in its mailbox, waiting
    in_flight: int  # handler calls running
    capacity: int
    leased: int  # messages it holds a lease on, per the fold
    accepted: int
    rejected: int
    delivered: int
    succeeded: int
    failed: int
    dead_lettered: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PumpStatistics:
    position: int  # the last record folded
    idle: bool
    stopping: bool
    fault: str | None  # why the log cannot be written now, if it cannot
    accepted: int  # messages accepted, ever
    rejected: int  # inputs the bus refused, ever
    open_threads: int
    dead_letters: int
    leases: int  # messages held under a lease now
    listeners: tuple[ListenerStatistics, ...]
    log: LogStatistics

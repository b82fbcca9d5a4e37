"""What a running pump reports about itself: one frozen value, taken at once.

``Pump.statistics()`` returns a ``PumpStatistics``; ``/metrics`` and the API serialise it as it
is, instead of reading the pump's mailboxes and projections one by one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xml_pipeline.log import LogStatistics
from xml_pipeline.runtime.mailbox import Mailbox
from xml_pipeline.state import State

__all__ = ["ListenerStatistics", "PumpStatistics", "measure"]


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


def measure(state: State, mailboxes: Mapping[str, Mailbox], *, idle: bool, stopping: bool,
            fault: str | None, log: LogStatistics) -> PumpStatistics:
    agents = state.agents.agents
    leased: dict[str, int] = {}
    for lease in state.scheduling.leases.values():
        leased[lease.listener] = leased.get(lease.listener, 0) + 1
    listeners = []
    for name, mailbox in mailboxes.items():
        info = agents.get(name)
        box = mailbox.statistics()
        listeners.append(ListenerStatistics(
            name=name, status=info.status if info is not None else "running",
            queued=box.queued, in_flight=box.in_flight, capacity=box.capacity,
            leased=leased.get(name, 0),
            accepted=info.accepted if info else 0, rejected=info.rejected if info else 0,
            delivered=info.delivered if info else 0, succeeded=info.succeeded if info else 0,
            failed=info.failed if info else 0,
            dead_lettered=info.dead_lettered if info else 0))
    threads = state.threads
    return PumpStatistics(
        position=state.position, idle=idle, stopping=stopping, fault=fault,
        accepted=threads.accepted, rejected=threads.rejected,
        open_threads=sum(1 for t in threads.threads.values() if t.open_count > 0),
        dead_letters=len(threads.dead_letters), leases=len(state.scheduling.leases),
        listeners=tuple(listeners), log=log)

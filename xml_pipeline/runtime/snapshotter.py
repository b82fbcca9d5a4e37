"""Periodic snapshots of the pump's state, kept by its log (``EventLog.snapshots``).

While the pump runs, a snapshot is taken every ``every`` records, so that a start after a crash
replays only the records after it; the pump takes a last one when it stops. The state is
encoded on the loop, between two events (the fold changes it in place), and the log keeps it
however its backend does (the file log writes it in a worker thread), one snapshot at a time.
A snapshot that cannot be kept is logged and changes nothing else: snapshots are an
optimisation only.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from xml_pipeline.runtime.ledger import Ledger

__all__ = ["Snapshotter"]

_log = logging.getLogger("xml_pipeline.runtime.pump")

_NEVER = sys.maxsize


class Snapshotter:
    """Snapshots of ``ledger.state`` every ``every`` records (0: only ``save``)."""

    def __init__(self, *, ledger: Ledger, every: int) -> None:
        if every < 0:
            raise ValueError(f"snapshot_every must be a number of records (0 or None for no "
                             f"periodic snapshots), not {every!r}.")
        self._ledger = ledger
        self._every = every
        #: the position whose fold starts the next snapshot (checked by the pump on each fold)
        self.due = _NEVER
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def every(self) -> int:
        """Records between periodic snapshots (0: none); a reload may change it."""
        return self._every

    @every.setter
    def every(self, records: int) -> None:
        self._every = records
        if self._task is None and not self._stopped:
            self.due = self._next(self._ledger.state.position)

    @property
    def saving(self) -> bool:
        """Whether a periodic snapshot is being saved now."""
        return self._task is not None

    def _next(self, after: int) -> int:
        return after + self._every if self._every else _NEVER

    def start(self, *, after: int) -> None:
        """Count records from position ``after``, where the pump's state starts."""
        self.due = self._next(after)

    def save_nowait(self, group: asyncio.TaskGroup | None) -> None:
        """Start a periodic snapshot of the state as it is now, saved by a task of ``group``.
        Does nothing while one is in flight, before the pump's task group exists, or once
        stopped; the next folded event tries again."""
        if group is None or self._stopped or self._task is not None:
            return
        state = self._ledger.state
        position = state.position
        if position > self._ledger.log.last_position:
            return  # folds follow appends, so this is durable; never snapshot what is not
        save = self._periodic(position, state.encode())
        try:
            self._task = group.create_task(save, name="snapshot")
        except RuntimeError:  # the task group is shutting down: no snapshot
            save.close()
            return
        self.due = _NEVER

    async def _periodic(self, position: int, state: bytes) -> None:
        try:
            await self._save(position, state)
        finally:
            self._task = None
            if not self._stopped:
                self.due = self._next(position)
            self._ledger.notify()

    async def _save(self, position: int, state: bytes) -> None:
        """Have the log keep ``state`` (of ``position``). Never raises but for cancellation: a
        failure is logged, since a snapshot only makes the next start faster."""
        try:
            saved = await self._ledger.log.snapshots.save(position, state)
        except Exception as exc:  # any failure: it must not end the pump's task group
            _log.warning("could not save a snapshot of position %d: %s", position, exc)
            return
        if not saved:
            _log.warning("no snapshot saved: the log does not hold record %d", position)

    def stop(self) -> None:
        """Take no more periodic snapshots."""
        self._stopped = True
        self.due = _NEVER

    async def save(self) -> None:
        """Save a snapshot of the state as it is now, once a periodic one in flight is done
        (this one supersedes it). Logs a failure instead of raising it."""
        if self._task is not None:
            await asyncio.wait([self._task])
        state = self._ledger.state
        await self._save(state.position, state.encode())

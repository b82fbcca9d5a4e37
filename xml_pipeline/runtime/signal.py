"""A change signal: ``await wait()`` returns at the next ``notify()``.

Every waiter re-checks its own condition after waking, so a notify with nobody waiting needs
no work at all; the signal counts its waiters itself instead of asking ``asyncio.Event``.
"""

from __future__ import annotations

import asyncio

__all__ = ["Signal"]


class Signal:
    __slots__ = ("_event", "_waiting")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiting = 0

    async def wait(self) -> None:
        """Return at the next ``notify()`` (or when cancelled)."""
        event = self._event
        self._waiting += 1
        try:
            await event.wait()
        finally:
            if event is self._event:  # cancelled before a notify; else the count was reset
                self._waiting -= 1

    def notify(self) -> None:
        """Wake everyone waiting now; those who wait after this wait for the next one."""
        if self._waiting:
            self._event.set()
            self._event = asyncio.Event()
            self._waiting = 0

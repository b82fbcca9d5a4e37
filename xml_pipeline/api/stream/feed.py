"""A subscription's feed: its events read from the log in order, with the notices that end it.

The feed reads the log itself (``log.follow``), pulling a record only once the previous one is
written: a slow client never blocks the pump and nothing piles up in memory for it. A feed that
falls ``MAX_LAG`` records further behind the log than the closest it has been ends with a
``lagging`` notice (where to resume); one that reaches a damaged record ends with an ``error``
notice; it also ends when the log closes, or when the application's streams are closed
(``close_streams``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
from starlette.applications import Starlette

from xml_pipeline.api.stream.subscription import Filter, Subscription
from xml_pipeline.envelope import format_timestamp
from xml_pipeline.errors import LogCorruptedError
from xml_pipeline.events import Recorded
from xml_pipeline.runtime.pump import Pump

__all__ = ["ERROR", "LAGGING", "MAX_LAG", "Item", "close_streams", "closing_event", "feed"]

#: How many records a stream may fall behind the closest it has been to the log's end.
MAX_LAG = 100_000

#: The kinds of the notices that end a feed (every other item is of its event type).
LAGGING = "lagging"
ERROR = "error"

_log = logging.getLogger("xml_pipeline.api")
_encode = msgspec.json.Encoder().encode
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                (b"\xe2\x80\xa9", b"\\u2029"))


@dataclass(frozen=True, slots=True)
class Item:
    position: int  # for a lagging notice: the position to resume after
    kind: str  # the event type, or "lagging"
    data: bytes  # a JSON object


def _body(record: Recorded) -> bytes:
    event = record.event
    data = _encode({"position": record.position, "type": type(event).__name__,
                    "at": format_timestamp(event.at), "data": event})
    # JSON leaves these unescaped, yet str.splitlines() (and so some SSE clients) ends a
    # line at each; escaped, a frame's data is always one line for every reader.
    for raw, escaped in _LINE_BREAKS:
        data = data.replace(raw, escaped)
    return data


async def feed(pump: Pump, wanted: Subscription) -> AsyncGenerator[Item, None]:
    """The subscription's events in order; after a lagging notice, an error notice (the log
    is damaged where it reads), or when the log closes, it ends."""
    log = pump.log
    accepts = Filter(pump, wanted)
    closest: int | None = None
    task = asyncio.current_task()
    records = log.follow(wanted.after)
    last_read = wanted.after if wanted.after is not None else log.last_position
    checked = _undamaged(records, lambda: last_read)
    try:
        async for record in checked:
            if isinstance(record, Item):
                yield record
                return
            last_read = record.position
            if task is not None and task.cancelling():
                return  # a cancellation that follow() swallowed (wait_for in Python 3.11)
            last = log.last_position
            behind = last - record.position
            closest = behind if closest is None else min(closest, behind)
            if behind - closest > MAX_LAG:
                after = record.position - 1
                yield Item(after, LAGGING, _encode({
                    "after": after, "last_position": last, "max_lag": MAX_LAG,
                    "message": f"This stream fell more than {MAX_LAG} records behind the log "
                               f"(at position {after} of {last}) and was closed; reconnect "
                               f"with after={after} to resume."}))
                return
            if accepts(record.event):
                yield Item(record.position, type(record.event).__name__, _body(record))
    finally:
        await checked.aclose()
        close = getattr(records, "aclose", None)  # the protocol promises an iterator only
        if close is not None:
            await close()


async def _undamaged(records: AsyncIterator[Recorded], last: Callable[[], int]
                     ) -> AsyncGenerator[Recorded | Item, None]:
    """``records``, then an error notice instead of the exception if the log is damaged where
    they are read (the one sure-to-fail place: reading on would fail again)."""
    try:
        async for record in records:
            yield record
    except LogCorruptedError as exc:
        after = last()
        _log.warning("An event stream stopped after position %d: %s", after, exc.message)
        yield Item(after, ERROR, _encode({"error": {
            "code": exc.code, "after": after, "message": exc.message}}))


def closing_event(app: Starlette) -> asyncio.Event:
    event: asyncio.Event | None = getattr(app.state, "event_streams_closing", None)
    if event is None:
        event = app.state.event_streams_closing = asyncio.Event()
    return event


def close_streams(app: Starlette) -> None:
    """End every open stream of ``app`` now, and every one opened from now on."""
    closing_event(app).set()

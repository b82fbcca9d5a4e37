"""The live tail of the event log: ``GET /events`` (Server-Sent Events) and ``WS /ws``.

Each stream reads the log itself (``log.follow``), pulling a record only once the previous one
is written: a slow client never blocks the pump and nothing piles up in memory for it. Events go
out in position order as ``{"position", "type", "at" (RFC 3339), "data": {its fields}}``.
A client that falls ``MAX_LAG`` records further behind the log than the closest it has been is
told where to resume (``lagging``) and disconnected; replaying from far back is not lagging.

Servers wait for open responses before the lifespan's shutdown, so whoever runs the server
calls ``close_streams(app)`` as shutdown begins. Streams also end when the log closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import (
    WebSocket,
    WebSocketDisconnect,
    WebSocketDisconnected,
    WebSocketState,
)

from xml_pipeline.api.responses import ApiError, error_response
from xml_pipeline.envelope import format_timestamp
from xml_pipeline.errors import LogCorruptedError
from xml_pipeline.events import CATALOGUE, Event, Recorded
from xml_pipeline.pump import Pump

__all__ = ["DAMAGED_CLOSE_CODE", "KEEPALIVE_INTERVAL", "LAGGING_CLOSE_CODE", "MAX_LAG",
           "SHUTDOWN_CLOSE_CODE", "Subscription", "close_streams", "routes"]

#: Seconds of silence after which an SSE stream sends a ``: keepalive`` comment.
KEEPALIVE_INTERVAL = 15.0
#: How many records a stream may fall behind the closest it has been to the log's end.
MAX_LAG = 100_000
#: The WebSocket close code after a lagging notice ("try again later").
LAGGING_CLOSE_CODE = 1013
#: The WebSocket close code after an ``error`` notice: the log is damaged where the stream
#: reached ("internal error"; the server goes on, and so do streams that stay before it).
DAMAGED_CLOSE_CODE = 1011
#: The WebSocket close code when the server shuts down or the log closes ("service restart").
#: uvicorn closes every open WebSocket with 1012 as its shutdown begins, before the
#: application hears of it; the application's own closes use the same code, so a client sees
#: one code whichever comes first.
SHUTDOWN_CLOSE_CODE = 1012

_LAGGING = "lagging"
_ERROR = "error"
_log = logging.getLogger("xml_pipeline.api")
_AGENT_FIELDS = ("listener", "agent", "sender", "to")
_OPTIONS = ("after", "thread", "agent", "types")
_encode = msgspec.json.Encoder().encode
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"),
                (b"\xe2\x80\xa9", b"\\u2029"))
_Gone = (WebSocketDisconnect, WebSocketDisconnected)


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
    position = last if after is None else _position(after)
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


def _position(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


class _Filter:
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


@dataclass(frozen=True, slots=True)
class _Item:
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


async def _items(pump: Pump, wanted: Subscription) -> AsyncGenerator[_Item, None]:
    """The subscription's events in order; after a lagging notice, an error notice (the log
    is damaged where it reads), or when the log closes, it ends."""
    log = pump.log
    accepts = _Filter(pump, wanted)
    closest: int | None = None
    task = asyncio.current_task()
    records = log.follow(wanted.after)
    last_read = wanted.after if wanted.after is not None else log.last_position
    checked = _undamaged(records, lambda: last_read)
    try:
        async for record in checked:
            if isinstance(record, _Item):
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
                yield _Item(after, _LAGGING, _encode({
                    "after": after, "last_position": last, "max_lag": MAX_LAG,
                    "message": f"This stream fell more than {MAX_LAG} records behind the log "
                               f"(at position {after} of {last}) and was closed; reconnect "
                               f"with after={after} to resume."}))
                return
            if accepts(record.event):
                yield _Item(record.position, type(record.event).__name__, _body(record))
    finally:
        await checked.aclose()
        close = getattr(records, "aclose", None)  # the protocol promises an iterator only
        if close is not None:
            await close()


async def _undamaged(records: AsyncIterator[Recorded], last: Callable[[], int]
                     ) -> AsyncGenerator[Recorded | _Item, None]:
    """``records``, then an error notice instead of the exception if the log is damaged where
    they are read (the one sure-to-fail place: reading on would fail again)."""
    try:
        async for record in records:
            yield record
    except LogCorruptedError as exc:
        after = last()
        _log.warning("An event stream stopped after position %d: %s", after, exc.message)
        yield _Item(after, _ERROR, _encode({"error": {
            "code": exc.code, "after": after, "message": exc.message}}))


async def _first_of(*waits: Coroutine[Any, Any, object]) -> None:
    """Run ``waits`` together until one ends; cancel and await the others."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(wait) for wait in waits]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()


def _closing(app: Starlette) -> asyncio.Event:
    event: asyncio.Event | None = getattr(app.state, "event_streams_closing", None)
    if event is None:
        event = app.state.event_streams_closing = asyncio.Event()
    return event


def close_streams(app: Starlette) -> None:
    """End every open stream of ``app`` now, and every one opened from now on."""
    _closing(app).set()


# ------------------------------------------------------------------ Server-Sent Events


def _chunk(body: bytes) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": True}


class _EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, items: AsyncGenerator[_Item, None], closing: asyncio.Event) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._items = items
        self._closing = closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        written = asyncio.Event()
        async with aclosing(self._items) as items:
            await _first_of(self._write(items, send, written), self._keepalive(send, written),
                            self._disconnected(receive), self._closing.wait())
        with suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _write(items: AsyncIterator[_Item], send: Send, written: asyncio.Event) -> None:
        with suppress(OSError):  # the client is gone
            async for item in items:
                await send(_chunk(b"id: %d\nevent: %s\ndata: %s\n\n"
                                  % (item.position, item.kind.encode(), item.data)))
                written.set()

    @staticmethod
    async def _keepalive(send: Send, written: asyncio.Event) -> None:
        with suppress(OSError):
            while True:
                written.clear()
                try:
                    # Not wait_for: in 3.11 it can swallow a cancellation that races a wake-up.
                    async with asyncio.timeout(KEEPALIVE_INTERVAL):
                        await written.wait()
                except TimeoutError:
                    await send(_chunk(b": keepalive\n\n"))

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


async def events(request: Request) -> Response:
    """Live events as Server-Sent Events, one per log record, from a position on. Filters:
    ``thread``, ``agent``, ``type`` (repeatable or comma-separated); a numeric
    ``Last-Event-ID`` header (a reconnecting browser's) overrides ``after``.
    ---
    parameters:
      - {name: after, in: query, description: "the log position to follow from (default: the
         current end)", schema: {type: integer, minimum: 0}}
      - {name: thread, in: query, description: "only the events of this thread",
         schema: {type: string, minLength: 1}}
      - {name: agent, in: query, description: "only the events that name this listener",
         schema: {type: string, minLength: 1}}
      - {name: type, in: query, description: "only events of these types (GET /api/v1/events
         answers 400 with details.valid_types for an unknown one)", style: form,
         explode: true, schema: {type: array, items: {type: string}}}
      - {name: Last-Event-ID, in: header, description: "the position a reconnecting client
         saw last; overrides after", schema: {type: string}}
    responses:
      "200":
        description: "text/event-stream: 'id: <position>', 'event: <type>', 'data: {position,
          type, at, data}' for each record, and ': keepalive' comments"
        content: {text/event-stream: {schema: {type: string}}}
      "400": {$ref: "#/components/responses/BadRequest"}
    """
    pump: Pump = request.app.state.pump
    query = request.query_params
    after: str | None = request.headers.get("last-event-id")
    if after is None or _position(after) is None:
        after = query.get("after")
    types = [name for value in query.getlist("type") for name in value.split(",")]
    try:
        wanted = subscription(pump, after=after, thread=query.get("thread"),
                              agent=query.get("agent"), types=types or None)
    except ApiError as error:
        return error_response(request, error)
    return _EventStream(_items(pump, wanted), _closing(request.app))


# ------------------------------------------------------------------ WebSocket


async def _send(websocket: WebSocket, lock: asyncio.Lock, data: bytes) -> bool:
    """Send one text message; False once the connection is closed or gone."""
    async with lock:
        if websocket.application_state != WebSocketState.CONNECTED:
            return False
        try:
            await websocket.send({"type": "websocket.send", "text": data.decode()})
        except _Gone:
            return False
    return True


async def _close(websocket: WebSocket, lock: asyncio.Lock, code: int, reason: str) -> None:
    async with lock:
        if websocket.application_state == WebSocketState.CONNECTED:
            with suppress(*_Gone):
                await websocket.close(code, reason)


async def _forward(websocket: WebSocket, lock: asyncio.Lock, pump: Pump,
                   wanted: Subscription) -> None:
    async with aclosing(_items(pump, wanted)) as items:
        async for item in items:
            if item.kind == _LAGGING:
                await _send(websocket, lock, b'{"lagging":%s}' % item.data)
                await _close(websocket, lock, LAGGING_CLOSE_CODE, "lagging")
                return
            if item.kind == _ERROR:
                await _send(websocket, lock, item.data)
                await _close(websocket, lock, DAMAGED_CLOSE_CODE, "the event log is damaged")
                return
            if not await _send(websocket, lock, item.data):
                return
    await _close(websocket, lock, SHUTDOWN_CLOSE_CODE, "the event log closed")


def _ws_subscription(pump: Pump, message: Message) -> Subscription:
    text = message.get("text")
    raw = text if text is not None else message.get("bytes") or b""
    try:
        request = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError("invalid_json", f"The message is not JSON: {exc}.") from exc
    options = request.get("subscribe") if isinstance(request, dict) else None
    extra = sorted(set(options) - set(_OPTIONS)) if isinstance(options, dict) else None
    if not isinstance(options, dict) or len(request) != 1 or extra:
        raise ApiError("invalid_request",
                       'Send {"subscribe": {...}} with any of "after", "thread", "agent" and '
                       f'"types"{f", not {extra}" if extra else ""}.',
                       details={"options": list(_OPTIONS)})
    return subscription(pump, after=options.get("after"), thread=options.get("thread"),
                        agent=options.get("agent"), types=options.get("types"))


async def websocket_events(websocket: WebSocket) -> None:
    """Live events over a WebSocket: send ``{"subscribe": {after?, thread?, agent?, types?}}``;
    the server answers ``{"subscribed": {...}}`` then one JSON message per event. A new
    subscribe replaces the previous one; an invalid message gets ``{"error": {...}}``."""
    await websocket.accept()
    pump: Pump = websocket.app.state.pump
    lock = asyncio.Lock()

    async def close_when_asked() -> None:
        await _closing(websocket.app).wait()
        await _close(websocket, lock, SHUTDOWN_CLOSE_CODE, "the server is shutting down")

    async with asyncio.TaskGroup() as group:
        watcher = group.create_task(close_when_asked())
        current: asyncio.Task[None] | None = None
        try:
            while (message := await websocket.receive())["type"] != "websocket.disconnect":
                try:
                    wanted = _ws_subscription(pump, message)
                except ApiError as error:
                    reply = {"error": {"code": error.code, "message": error.message,
                                       "details": error.details}}
                    if not await _send(websocket, lock, _encode(reply)):
                        break
                    continue
                if current is not None:
                    current.cancel()
                    await asyncio.wait([current])
                if not await _send(websocket, lock, _encode({"subscribed": wanted.describe()})):
                    break
                current = group.create_task(_forward(websocket, lock, pump, wanted))
        finally:
            watcher.cancel()
            if current is not None:
                current.cancel()


routes: list[BaseRoute] = [
    Route("/events", events, methods=["GET"]),
    WebSocketRoute("/ws", websocket_events),
]

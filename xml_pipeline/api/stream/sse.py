"""``GET /events``: a subscription's feed as Server-Sent Events, with keepalive comments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import aclosing, suppress
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from xml_pipeline.api.responses import ApiError, error_response
from xml_pipeline.api.stream.feed import Item, closing_event, feed
from xml_pipeline.api.stream.subscription import as_position, subscription
from xml_pipeline.runtime.pump import Pump

__all__ = ["KEEPALIVE_INTERVAL", "events"]

#: Seconds of silence after which an SSE stream sends a ``: keepalive`` comment.
KEEPALIVE_INTERVAL = 15.0


async def _first_of(*waits: Coroutine[Any, Any, object]) -> None:
    """Run ``waits`` together until one ends; cancel and await the others."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(wait) for wait in waits]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()


def _chunk(body: bytes) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": True}


class _EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, items: AsyncGenerator[Item, None], closing: asyncio.Event) -> None:
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
    async def _write(items: AsyncIterator[Item], send: Send, written: asyncio.Event) -> None:
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
    if after is None or as_position(after) is None:
        after = query.get("after")
    types = [name for value in query.getlist("type") for name in value.split(",")]
    try:
        wanted = subscription(pump, after=after, thread=query.get("thread"),
                              agent=query.get("agent"), types=types or None)
    except ApiError as error:
        return error_response(request, error)
    return _EventStream(feed(pump, wanted), closing_event(request.app))

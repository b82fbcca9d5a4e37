"""``WS /ws``: subscriptions over a WebSocket, each message a subscription's event, and the
close codes that say why the server ended it."""

from __future__ import annotations

import asyncio
from contextlib import aclosing, suppress

import msgspec
from starlette.types import Message
from starlette.websockets import (
    WebSocket,
    WebSocketDisconnect,
    WebSocketDisconnected,
    WebSocketState,
)

from xml_pipeline.api.responses import ApiError
from xml_pipeline.api.stream.feed import ERROR, LAGGING, closing_event, feed
from xml_pipeline.api.stream.subscription import Subscription, subscription
from xml_pipeline.runtime.pump import Pump

__all__ = ["DAMAGED_CLOSE_CODE", "LAGGING_CLOSE_CODE", "SHUTDOWN_CLOSE_CODE",
           "websocket_events"]

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

_OPTIONS = ("after", "thread", "agent", "types")
_encode = msgspec.json.Encoder().encode
_Gone = (WebSocketDisconnect, WebSocketDisconnected)


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
    async with aclosing(feed(pump, wanted)) as items:
        async for item in items:
            if item.kind == LAGGING:
                await _send(websocket, lock, b'{"lagging":%s}' % item.data)
                await _close(websocket, lock, LAGGING_CLOSE_CODE, "lagging")
                return
            if item.kind == ERROR:
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
        await closing_event(websocket.app).wait()
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

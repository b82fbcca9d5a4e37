"""The live tail of the event log: ``GET /events`` (Server-Sent Events) and ``WS /ws``.

Each stream is a subscription's feed (``feed``): the log's records in position order, each as
``{"position", "type", "at" (RFC 3339), "data": {its fields}}``, read at the client's pace.
A client that falls ``feed.MAX_LAG`` records further behind the log than the closest it has
been is told where to resume (``lagging``) and disconnected; replaying from far back is not
lagging. ``sse`` and ``websocket`` carry the feed; ``subscription`` says what it holds.

Servers wait for open responses before the lifespan's shutdown, so whoever runs the server
calls ``close_streams(app)`` as shutdown begins. Streams also end when the log closes.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route, WebSocketRoute

from xml_pipeline.api.stream.feed import close_streams
from xml_pipeline.api.stream.sse import events
from xml_pipeline.api.stream.websocket import websocket_events

__all__ = ["close_streams", "routes"]

routes: list[BaseRoute] = [
    Route("/events", events, methods=["GET"]),
    WebSocketRoute("/ws", websocket_events),
]

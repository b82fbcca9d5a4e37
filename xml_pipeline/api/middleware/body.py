"""The cap on request bodies: a body over the limit gets 413 before the endpoint sees it."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xml_pipeline.api.responses import send_error

__all__ = ["BodyLimitMiddleware", "declared_over"]


def declared_over(scope: Scope, limit: int) -> bool:
    """Whether the request's Content-Length is over ``limit`` (or not a number): refused with
    413 on the header, without reading the body."""
    length = Headers(scope=scope).get("content-length")
    return length is not None and (not length.isdigit() or int(length) > limit)


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413 (by Content-Length up front, or
    while reading a chunked body)."""

    def __init__(self, app: ASGIApp, *, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt  # paths that enforce (and record) the limit themselves

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        too_large = (f"The request body is over the limit of {self.limit} bytes; send a "
                     "smaller body.")
        if declared_over(scope, self.limit):
            await send_error(scope, send, 413, "body_too_large", too_large)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await send_error(scope, send, 413, "body_too_large", too_large)

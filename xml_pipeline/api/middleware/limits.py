"""The bound on requests in progress, and on the time and slots that request bodies take."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xml_pipeline.api.middleware.body import declared_over
from xml_pipeline.api.responses import send_error

__all__ = ["RequestLimitMiddleware"]


def _has_body(scope: Scope) -> bool:
    headers = Headers(scope=scope)
    length = headers.get("content-length")
    return (length is not None and length.strip() != "0") or "transfer-encoding" in headers


class _Busy(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _BodyTimeout(Exception):
    pass


_HANDLING = "handling"
_RECEIVING = "receiving"
_CLOSE = (b"connection", b"close")
#: how long, and how much, of a body is still read after an early answer before the close
_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 16 * 1024 * 1024


def _closing(receive: Receive, send: Send, until: float) -> Send:
    """``send`` for an answer given before the request body was read to the end: it closes
    the connection, after reading (and dropping) what still comes of the body until
    ``until`` or ``_DRAIN_BYTES``. Closing a socket with unread data in it resets the
    connection, and a client still sending would lose the answer."""

    async def closing_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), _CLOSE]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            await send({**message, "more_body": True})
            await _drain(receive, until)
            message = {"type": "http.response.body", "body": b""}
        await send(message)

    return closing_send


async def _drain(receive: Receive, until: float) -> None:
    seen = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(until):
            while seen <= _DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    return
                seen += len(message.get("body", b""))


class RequestLimitMiddleware:
    """Bound the requests in progress, without letting slow clients hold the slots.

    - At most ``limit()`` requests (``organism.api.max_requests``) are handled at once. A
      request counts from the moment its body is complete (at once if it has none); while
      ``limit()`` are handled, more get 503 ``busy`` with ``Retry-After``, before their body
      is read if they arrive then.
    - A body must arrive within ``body_timeout()`` seconds (``organism.api.body_timeout``) of
      the headers; a slower one gets 408 ``body_timeout``.
    - A body that is still arriving after its first part holds one of another ``limit()``
      slots, kept for bodies in transit: slow senders can crowd out only other slow senders,
      and each for ``body_timeout`` at most, never reads nor clients that send their body at
      once. A request whose body has not begun holds its connection only.
    - A response sent before the body was read to the end closes the connection, after
      dropping what of the body still comes within a second.
    - A request whose Content-Length is over ``max_body()`` goes on at once, to be refused on
      its header (413) by the layer below: it waits for no body.

    Event streams, ``/health`` and ``/metrics`` are not counted: streams are long-lived and
    have their own rules, and monitoring must see an overloaded server."""

    def __init__(self, app: ASGIApp, *, limit: Callable[[], int],
                 body_timeout: Callable[[], float], max_body: Callable[[], int],
                 exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit  # read at each request: a reload may change it
        self.body_timeout = body_timeout
        self.max_body = max_body
        self.exempt = exempt
        self.in_progress = 0
        self.receiving = 0

    def _busy(self, slot: str, limit: int) -> str:
        what = (f"handling {limit} requests" if slot == _HANDLING
                else f"receiving {limit} request bodies")
        return (f"The server is {what} already (organism.api.max_requests); retry after "
                "Retry-After seconds.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        body = _has_body(scope)
        if self.in_progress >= limit:
            if body:  # not read: the connection cannot serve another request after it
                until = asyncio.get_running_loop().time() + min(self.body_timeout(),
                                                                _DRAIN_SECONDS)
                send = _closing(receive, send, until)
            await send_error(scope, send, 503, "busy", self._busy(_HANDLING, limit),
                              [(b"retry-after", b"1")])
            return
        if not body or declared_over(scope, self.max_body()):
            if body:  # refused on its Content-Length below, at once: not waited for
                until = asyncio.get_running_loop().time() + min(self.body_timeout(),
                                                                _DRAIN_SECONDS)
                send = _closing(receive, send, until)
            self.in_progress += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.in_progress -= 1
            return
        await self._call_with_body(scope, receive, send)

    async def _call_with_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.body_timeout()
        deadline = asyncio.get_running_loop().time() + timeout
        slot: str | None = None
        complete = started = False
        first: Message | None = None

        def take(wanted: str) -> None:
            nonlocal slot
            if slot == wanted:
                return
            limit = self.limit()
            if (self.in_progress if wanted == _HANDLING else self.receiving) >= limit:
                raise _Busy(self._busy(wanted, limit))
            release()
            if wanted == _HANDLING:
                self.in_progress += 1
            else:
                self.receiving += 1
            slot = wanted

        def release() -> None:
            nonlocal slot
            if slot == _HANDLING:
                self.in_progress -= 1
            elif slot == _RECEIVING:
                self.receiving -= 1
            slot = None

        async def next_part() -> Message:
            nonlocal complete
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeout from None
            complete = message["type"] != "http.request" or not message.get("more_body")
            take(_HANDLING if complete else _RECEIVING)
            return message

        async def limited_receive() -> Message:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await (receive() if complete else next_part())

        closing: Send | None = None

        async def tracking_send(message: Message) -> None:
            nonlocal started, closing
            if message["type"] == "http.response.start":
                started = True
                if not complete:  # answered early: the slot goes, the rest is dropped
                    release()
                    loop_time = asyncio.get_running_loop().time()
                    closing = _closing(receive, send, min(deadline, loop_time + _DRAIN_SECONDS))
            await (closing or send)(message)

        try:
            first = await next_part()
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTimeout:
            if not started:
                await send_error(scope, send, 408, "body_timeout",
                                  f"The request body did not arrive within {timeout:g} seconds "
                                  "(organism.api.body_timeout); send the whole body at once.",
                                  [_CLOSE])
        except _Busy as busy:
            if not started:
                await send_error(scope, tracking_send, 503, "busy", busy.message,
                                  [(b"retry-after", b"1")])
        finally:
            release()

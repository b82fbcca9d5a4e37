"""Bearer-token authentication and the other request guards, as plain ASGI middleware.

- With a token configured (``XML_PIPELINE_API_TOKEN``), every ``/api/v1`` route and
  ``/metrics`` require ``Authorization: Bearer <token>``, compared in constant time. The token
  is read from that header only: never from the query string or a cookie.
- Every response carries an ``X-Request-ID`` (the client's, if it sent a sane one).
- Request bodies are capped; a larger body gets 413 before the endpoint sees it.
- At most ``organism.api.max_requests`` requests are handled at once; more get 503 with
  ``Retry-After``, so overload never queues without bound. A request counts once its body is
  complete, and a body must arrive within ``organism.api.body_timeout`` (408 after it), so that
  slow senders cannot hold the slots that other clients need.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xml_pipeline.api.responses import _encoder

__all__ = ["BodyLimitMiddleware", "GuardMiddleware", "RequestLimitMiddleware", "TOKEN_ENV"]

TOKEN_ENV = "XML_PIPELINE_API_TOKEN"
_PROTECTED = ("/api/v1", "/metrics")
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


def _error_body(scope: Scope, code: str, message: str) -> bytes:
    request_id = scope.get("state", {}).get("request_id")
    return _encoder.encode({"error": {"code": code, "message": message, "details": None,
                                      "request_id": request_id}})


async def _send_error(scope: Scope, send: Send, status: int, code: str, message: str,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _error_body(scope, code, message)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())] + (extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True, slots=True)
class _Refusal:
    """What a guard answers instead of the endpoint: an HTTP error, or a WebSocket close."""

    status: int
    code: str
    message: str
    ws_reason: str
    extra: tuple[tuple[bytes, bytes], ...] = ()

    async def send(self, scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": self.ws_reason})
            return
        await _send_error(scope, send, self.status, self.code, self.message, list(self.extra))


class _TokenCheck:
    """With a token, ``/api/v1`` and ``/metrics`` require ``Authorization: Bearer <token>``."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode("utf-8") if token else None

    def _allowed(self, scope: Scope) -> bool:
        if self._token is None:
            return True
        path: str = scope.get("path", "")
        if not path.startswith(_PROTECTED):
            return True
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            # Compare anyway, so that a missing header costs the same as a wrong one.
            hmac.compare_digest(self._token, b"\0" * len(self._token))
            return False
        return hmac.compare_digest(self._token, given.strip().encode("utf-8", "replace"))

    def refusal(self, scope: Scope) -> _Refusal | None:
        if self._allowed(scope):
            return None
        return _Refusal(401, "unauthorized", "A valid 'Authorization: Bearer <token>' header is "
                        f"required (the token is the server's {TOKEN_ENV}).",
                        "authentication required",
                        ((b"www-authenticate", b'Bearer realm="xml-pipeline"'),))


class GuardMiddleware:
    """The guards that need no I/O, in one layer (each layer costs every request a coroutine
    resumed at every step): an ``X-Request-ID`` on every answer (the client's, if sane), then
    the token (``_TokenCheck``), then, without a token, the origin (``_LocalOnlyCheck``)."""

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self.checks = (_TokenCheck(token), _LocalOnlyCheck(token))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given and _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        for check in self.checks:
            refusal = check.refusal(scope)
            if refusal is not None:
                await refusal.send(scope, send_with_id)
                return
        await self.app(scope, receive, send_with_id)


_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PAGE_SCHEMES = {"ws": "http", "wss": "https"}


def _hostname(value: str) -> str:
    """The host of a ``Host`` header, without its port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _origin(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an http(s) URL, None for anything else (``null``, ``file:``,
    a malformed value)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return scheme, parts.hostname, port if port is not None else _DEFAULT_PORTS[scheme]


def _same_origin(a: str, b: str) -> bool:
    origin = _origin(a)
    return origin is not None and origin == _origin(b)


def _own_origin(scope: Scope, host: str) -> str:
    """This server's own origin as the client addressed it (the scheme and ``Host``)."""
    scheme = scope.get("scheme", "http")
    return f"{_PAGE_SCHEMES.get(scheme, scheme)}://{host}"


class _LocalOnlyCheck:
    """Without a token, only this machine may talk to the API: a ``Host`` that is not a
    loopback name (DNS rebinding) gets 403, and so does a request with an ``Origin`` that is
    not this server's own (scheme, host and port of the ``Host`` it asked for). That covers a
    web page making the browser post to 127.0.0.1 or open a WebSocket, a page on another local
    port, and the ``null`` origin of a sandboxed frame or a ``data:`` or ``file:`` page. Clients
    that are not browsers send no ``Origin``. With a token, the token decides and this guard
    stands aside."""

    def __init__(self, token: str | None) -> None:
        self.active = not token

    def refusal(self, scope: Scope) -> _Refusal | None:
        if not self.active:
            return None
        headers = Headers(scope=scope)
        host_header = headers.get("host", "127.0.0.1")
        host = _hostname(host_header)
        origin = headers.get("origin")
        own = _own_origin(scope, host_header.strip())
        if host in _LOOPBACK_NAMES and (origin is None or _same_origin(origin, own)):
            return None
        if host not in _LOOPBACK_NAMES:
            what = (f"the Host {host_header!r} are refused: without an API token only this "
                    "machine's own clients may use the API.")
        else:
            what = (f"a page of {origin!r} are refused: without an API token only this "
                    f"machine's own clients and this server's own pages ({own}) may use the "
                    "API.")
        return _Refusal(403, "forbidden_origin",
                        f"Requests from {what} Set {TOKEN_ENV} to allow others.",
                        "only this server's own pages may connect without a token")


def _declared_over(scope: Scope, limit: int) -> bool:
    """Whether the request's Content-Length is over ``limit`` (or not a number): refused with
    413 on the header, without reading the body."""
    length = Headers(scope=scope).get("content-length")
    return length is not None and (not length.isdigit() or int(length) > limit)


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
            await _send_error(scope, send, 503, "busy", self._busy(_HANDLING, limit),
                              [(b"retry-after", b"1")])
            return
        if not body or _declared_over(scope, self.max_body()):
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
                await _send_error(scope, send, 408, "body_timeout",
                                  f"The request body did not arrive within {timeout:g} seconds "
                                  "(organism.api.body_timeout); send the whole body at once.",
                                  [_CLOSE])
        except _Busy as busy:
            if not started:
                await _send_error(scope, tracking_send, 503, "busy", busy.message,
                                  [(b"retry-after", b"1")])
        finally:
            release()


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
        if _declared_over(scope, self.limit):
            await _send_error(scope, send, 413, "body_too_large", too_large)
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
                await _send_error(scope, send, 413, "body_too_large", too_large)


class _TooLarge(Exception):
    pass

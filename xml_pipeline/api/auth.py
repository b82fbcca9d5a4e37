"""Bearer-token authentication and the other request guards, as plain ASGI middleware.

- With a token configured (``XML_PIPELINE_API_TOKEN``), every ``/api/v1`` route and
  ``/metrics`` require ``Authorization: Bearer <token>``, compared in constant time. The token
  is read from that header only: never from the query string or a cookie.
- Every response carries an ``X-Request-ID`` (the client's, if it sent a sane one).
- Request bodies are capped; a larger body gets 413 before the endpoint sees it.
- At most ``organism.api.max_requests`` requests are handled at once; more get 503 with
  ``Retry-After`` before their body is read, so overload never queues without bound.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xml_pipeline.api.responses import _encoder

__all__ = ["AuthMiddleware", "BodyLimitMiddleware", "LocalOnlyMiddleware",
           "RequestIdMiddleware", "RequestLimitMiddleware", "TOKEN_ENV"]

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


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given and _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008,
                        "reason": "authentication required"})
            return
        await _send_error(scope, send, 401, "unauthorized",
                          "A valid 'Authorization: Bearer <token>' header is required "
                          f"(the token is the server's {TOKEN_ENV}).",
                          [(b"www-authenticate", b'Bearer realm="xml-pipeline"')])


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


class LocalOnlyMiddleware:
    """Without a token, only this machine may talk to the API: a ``Host`` that is not a
    loopback name (DNS rebinding) gets 403, and so does a request with an ``Origin`` that is
    not this server's own (scheme, host and port of the ``Host`` it asked for). That covers a
    web page making the browser post to 127.0.0.1 or open a WebSocket, a page on another local
    port, and the ``null`` origin of a sandboxed frame or a ``data:`` or ``file:`` page. Clients
    that are not browsers send no ``Origin``. With a token, the token decides and this guard
    stands aside."""

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self.active = not token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.active or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host_header = headers.get("host", "127.0.0.1")
        host = _hostname(host_header)
        origin = headers.get("origin")
        own = _own_origin(scope, host_header.strip())
        if host in _LOOPBACK_NAMES and (origin is None or _same_origin(origin, own)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008,
                        "reason": "only this server's own pages may connect without a token"})
            return
        if host not in _LOOPBACK_NAMES:
            what = (f"the Host {host_header!r} are refused: without an API token only this "
                    "machine's own clients may use the API.")
        else:
            what = (f"a page of {origin!r} are refused: without an API token only this "
                    f"machine's own clients and this server's own pages ({own}) may use the "
                    "API.")
        await _send_error(scope, send, 403, "forbidden_origin",
                          f"Requests from {what} Set {TOKEN_ENV} to allow others.")


class RequestLimitMiddleware:
    """Answer 503 ``busy`` (with ``Retry-After``) while ``limit`` requests are in progress.
    Event streams, ``/health`` and ``/metrics`` are not counted: streams are long-lived and
    have their own rules, and monitoring must see an overloaded server."""

    def __init__(self, app: ASGIApp, *, limit: Callable[[], int],
                 exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit  # read at each request: a reload may change it
        self.exempt = exempt
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        if self.in_progress >= limit:
            await _send_error(scope, send, 503, "busy",
                              f"The server is handling {limit} requests already "
                              "(organism.api.max_requests); retry after Retry-After seconds.",
                              [(b"retry-after", b"1")])
            return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


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
        length = Headers(scope=scope).get("content-length")
        too_large = (f"The request body is over the limit of {self.limit} bytes; send a "
                     "smaller body.")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
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

"""Every guard in one pure-ASGI layer: the request id, the token, the origin, the bound on
requests in progress, the time and size of request bodies."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable, Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from xml_pipeline.api.auth import LocalOnlyCheck, TokenCheck
from xml_pipeline.api.middleware.limits import (
    BodyTimeoutError,
    BusyError,
    Counter,
    Exchange,
    TooLargeError,
    busy_message,
    declared_over,
)
from xml_pipeline.api.responses import send_error

__all__ = ["Guard", "header_fields"]

_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}\Z")
_RETRY = [(b"retry-after", b"1")]
_CLOSE = [(b"connection", b"close")]
#: how long a body is still drained after an answer given before it was read
_DRAIN_SECONDS = 1.0
#: the request headers the guards read (the first of each, as Starlette's ``Headers.get``)
_FIELDS = frozenset({b"x-request-id", b"authorization", b"host", b"origin",
                     b"content-length", b"transfer-encoding"})


def header_fields(scope: Scope) -> dict[bytes, bytes]:
    """The headers the guards read, in one pass over the request's headers."""
    fields: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _FIELDS and name not in fields:
            fields[name] = value
    return fields


class Guard:
    """The guards, outermost first, in one layer (each layer costs every request a coroutine
    resumed at every step):

    - an ``X-Request-ID`` on every answer (the client's, if sane), also in
      ``scope["state"]["request_id"]``;
    - who may use the API: the token (``TokenCheck``) or, without one, this machine
      (``LocalOnlyCheck``);
    - at most ``limit()`` requests (``organism.api.max_requests``) are handled at once. A
      request counts from the moment its body is complete (at once if it has none); while
      ``limit()`` are handled, more get 503 ``busy`` with ``Retry-After``, before their body
      is read if they arrive then;
    - a body must arrive within ``body_timeout()`` seconds (``organism.api.body_timeout``) of
      the headers; a slower one gets 408 ``body_timeout``. A body that is still arriving after
      its first part holds one of another ``limit()`` slots, kept for bodies in transit: slow
      senders can crowd out only other slow senders, and each for ``body_timeout`` at most,
      never reads nor clients that send their body at once. A request whose body has not
      begun holds its connection only;
    - a response sent before the body was read to the end closes the connection, after
      dropping what of the body still comes within a second;
    - a request whose Content-Length is over ``max_body`` waits for no body: it goes on at
      once, to be refused on its header (413);
    - request bodies over ``max_body`` bytes get 413 ``body_too_large`` (by Content-Length up
      front, or while reading a chunked body), except on the ``self_limited`` paths, whose
      endpoints enforce (and record) the limit themselves.

    ``uncounted`` paths (event streams, ``/health``, ``/metrics``) take no slot: streams are
    long-lived and have their own rules, and monitoring must see an overloaded server.
    ``direct`` maps ``(method, path)`` to a plain ASGI endpoint called in place of ``app``,
    past its routing, with the same guards."""

    def __init__(self, app: ASGIApp, *, token: str | None, limit: Callable[[], int],
                 body_timeout: Callable[[], float], max_body: int,
                 uncounted: tuple[str, ...] = (), self_limited: tuple[str, ...] = (),
                 direct: Mapping[tuple[str, str], ASGIApp] | None = None) -> None:
        self.app = app
        self.checks = (TokenCheck(token), LocalOnlyCheck(token))
        self.limit = limit  # read at each request: a reload may change it
        self.body_timeout = body_timeout
        self.max_body = max_body
        self.uncounted = uncounted
        self.self_limited = self_limited
        self.direct = dict(direct or {})
        self.counter = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        fields = header_fields(scope)
        given = fields.get(b"x-request-id")
        request_id = (given.decode("ascii") if given and _SANE_ID.match(given)
                      else secrets.token_hex(16))
        scope.setdefault("state", {})["request_id"] = request_id
        exchange = Exchange(receive, send, (b"x-request-id", request_id.encode()))
        for check in self.checks:
            refusal = check.refusal(scope, fields)
            if refusal is not None:
                await refusal.send(scope, exchange.send)
                return
        if kind != "http":
            await self.app(scope, receive, exchange.send)
            return
        app = self.direct.get((scope["method"], scope["path"]), self.app)
        if scope["path"] in self.uncounted:
            await self._capped(app, scope, exchange, fields)
            return
        await self._counted(app, scope, exchange, fields)

    async def _counted(self, app: ASGIApp, scope: Scope, exchange: Exchange,
                       fields: dict[bytes, bytes]) -> None:
        limit = self.limit()
        length = fields.get(b"content-length")
        body = (length is not None and length.strip() != b"0") or b"transfer-encoding" in fields
        counter = self.counter
        if counter.handling >= limit:
            if body:  # not read: the connection cannot serve another request after it
                exchange.closing(min(self.body_timeout(), _DRAIN_SECONDS))
            await send_error(scope, exchange.send, 503, "busy", busy_message(True, limit),
                             _RETRY)
            return
        if not body or declared_over(length, self.max_body):
            if body:  # refused on its Content-Length below, at once: not waited for
                exchange.closing(min(self.body_timeout(), _DRAIN_SECONDS))
            counter.handling += 1
            try:
                await self._capped(app, scope, exchange, fields)
            finally:
                counter.handling -= 1
            return
        timeout = self.body_timeout()
        exchange.track(counter, limit, asyncio.get_running_loop().time() + timeout)
        try:
            exchange.first = await exchange.next_part()
            await self._capped(app, scope, exchange, fields)
        except BodyTimeoutError:
            if not exchange.started:
                exchange.complete = True  # the answer closes, without waiting for more body
                await send_error(scope, exchange.send, 408, "body_timeout",
                                 f"The request body did not arrive within {timeout:g} seconds "
                                 "(organism.api.body_timeout); send the whole body at once.",
                                 _CLOSE)
        except BusyError as busy:
            if not exchange.started:
                await send_error(scope, exchange.send, 503, "busy", busy.message, _RETRY)
        finally:
            exchange.release()

    async def _capped(self, app: ASGIApp, scope: Scope, exchange: Exchange,
                      fields: dict[bytes, bytes]) -> None:
        if scope["path"] in self.self_limited:
            await app(scope, exchange.receive, exchange.send)
            return
        too_large = (f"The request body is over the limit of {self.max_body} bytes; send a "
                     "smaller body.")
        if declared_over(fields.get(b"content-length"), self.max_body):
            await send_error(scope, exchange.send, 413, "body_too_large", too_large)
            return
        exchange.cap = self.max_body
        try:
            await app(scope, exchange.receive, exchange.send)
        except TooLargeError:
            if not exchange.started:
                await send_error(scope, exchange.send, 413, "body_too_large", too_large)

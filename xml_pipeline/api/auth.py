"""Who may use the API: the holder of the bearer token or, without a token, this machine.

- With a token configured (``XML_PIPELINE_API_TOKEN``), every ``/api/v1`` route and
  ``/metrics`` require ``Authorization: Bearer <token>``, compared in constant time. The token
  is read from that header only: never from the query string or a cookie (``TokenCheck``).
- Without a token, only this machine's own clients and this server's own pages may use the
  API (``LocalOnlyCheck``).

Each check looks at a connection's scope and the headers it reads (the first of each name, as
raw bytes: ``middleware.guard.header_fields``) and answers a ``Refusal`` or None; the guard
middleware (``xml_pipeline.api.middleware.guard``) runs them and sends the refusal.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import Scope, Send

from xml_pipeline.api.responses import send_error

__all__ = ["LocalOnlyCheck", "Refusal", "TOKEN_ENV", "TokenCheck"]

TOKEN_ENV = "XML_PIPELINE_API_TOKEN"
_PROTECTED = ("/api/v1", "/metrics")


@dataclass(frozen=True, slots=True)
class Refusal:
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
        await send_error(scope, send, self.status, self.code, self.message, self.extra)


class TokenCheck:
    """With a token, ``/api/v1`` and ``/metrics`` require ``Authorization: Bearer <token>``."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode("utf-8") if token else None

    def _allowed(self, scope: Scope, fields: Mapping[bytes, bytes]) -> bool:
        if self._token is None:
            return True
        path: str = scope.get("path", "")
        if not path.startswith(_PROTECTED):
            return True
        header = fields.get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            # Compare anyway, so that a missing header costs the same as a wrong one.
            hmac.compare_digest(self._token, b"\0" * len(self._token))
            return False
        return hmac.compare_digest(self._token, given.strip().encode("utf-8", "replace"))

    def refusal(self, scope: Scope, fields: Mapping[bytes, bytes]) -> Refusal | None:
        if self._allowed(scope, fields):
            return None
        return Refusal(401, "unauthorized", "A valid 'Authorization: Bearer <token>' header is "
                       f"required (the token is the server's {TOKEN_ENV}).",
                       "authentication required",
                       ((b"www-authenticate", b'Bearer realm="xml-pipeline"'),))


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


class LocalOnlyCheck:
    """Without a token, only this machine may talk to the API: a ``Host`` that is not a
    loopback name (DNS rebinding) gets 403, and so does a request with an ``Origin`` that is
    not this server's own (scheme, host and port of the ``Host`` it asked for). That covers a
    web page making the browser post to 127.0.0.1 or open a WebSocket, a page on another local
    port, and the ``null`` origin of a sandboxed frame or a ``data:`` or ``file:`` page. Clients
    that are not browsers send no ``Origin``. With a token, the token decides and this guard
    stands aside."""

    def __init__(self, token: str | None) -> None:
        self.active = not token

    def refusal(self, scope: Scope, fields: Mapping[bytes, bytes]) -> Refusal | None:
        if not self.active:
            return None
        host_header = fields.get(b"host", b"127.0.0.1").decode("latin-1")
        host = _hostname(host_header)
        origin_header = fields.get(b"origin")
        origin = None if origin_header is None else origin_header.decode("latin-1")
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
        return Refusal(403, "forbidden_origin",
                       f"Requests from {what} Set {TOKEN_ENV} to allow others.",
                       "only this server's own pages may connect without a token")

"""Response shapes shared by every endpoint: JSON bodies, errors, lists, times.

Errors are ``{"error": {"code", "message", "details", "request_id"}}`` with the status that
fits, from an endpoint (``error_response``) or from a middleware that answers before it
(``send_error``); lists are ``{"<items>": [...], "count", "total", "offset", "limit"}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import Scope, Send

from xml_pipeline.envelope import format_timestamp
from xml_pipeline.errors import XmlPipelineError

__all__ = [
    "ApiError",
    "JSONResponse",
    "STATUS_BY_CODE",
    "client_gone",
    "encode",
    "error_response",
    "listing",
    "send_error",
    "status_for",
    "timestamp",
]

_encoder = msgspec.json.Encoder()
#: a JSON body's bytes
encode = _encoder.encode

#: The HTTP status of each error code.
STATUS_BY_CODE: dict[str, int] = {
    "malformed_xml": 400,
    "forbidden_xml": 400,
    "xml_too_deep": 400,
    "invalid_envelope": 400,
    "invalid_xml": 400,
    "invalid_json": 400,
    "invalid_request": 400,
    "client_disconnected": 400,
    "unauthorized": 401,
    "undeclared_peer": 403,
    "forbidden_origin": 403,
    "not_found": 404,
    "unknown_listener": 404,
    "method_not_allowed": 405,
    "thread_closed": 409,
    "xml_too_large": 413,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_payload": 422,
    "invalid_organism": 422,
    "mailbox_full": 429,
    "busy": 503,
    "log_error": 503,
    "log_write_failed": 503,
    "log_closed": 503,
    "log_locked": 503,
    "log_corrupted": 503,
}


def status_for(code: str) -> int:
    return STATUS_BY_CODE.get(code, 400 if code.startswith("invalid") else 500)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


class ApiError(Exception):
    """An error answered to the client as-is (never a stack trace)."""

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 details: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else status_for(code)
        self.details = details
        self.headers = dict(headers or {})

    @classmethod
    def from_error(cls, exc: XmlPipelineError) -> ApiError:
        details: dict[str, Any] = {}
        where = getattr(exc, "where", None)
        if where:
            details["where"] = where
        problems = getattr(exc, "problems", None)
        if problems:
            details["problems"] = [{"file": p.file, "line": p.line, "message": p.message}
                                   for p in problems]
        headers = {}
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is None and exc.code.startswith("log_"):
            retry_after = 1.0
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        return cls(exc.code, exc.message, details=details or None, headers=headers)


def client_gone() -> ApiError:
    """The answer to a client that hung up while sending its body: it reaches nobody, and
    nothing broke."""
    return ApiError("client_disconnected", "The client disconnected before sending the whole "
                                           "request body; send it again.")


def request_id(conn: HTTPConnection) -> str | None:
    value = conn.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def error_response(conn: HTTPConnection, error: ApiError) -> JSONResponse:
    body = {"error": {"code": error.code, "message": error.message, "details": error.details,
                      "request_id": request_id(conn)}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


async def send_error(scope: Scope, send: Send, status: int, code: str, message: str,
                     extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Answer ``status`` with the error body, straight over ASGI: for the middleware, which
    answers before there is a request or an application to raise ``ApiError`` in."""
    request_id = scope.get("state", {}).get("request_id")
    body = _encoder.encode({"error": {"code": code, "message": message, "details": None,
                                      "request_id": request_id}})
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def timestamp(seconds: float | None) -> str | None:
    """A time in a response: RFC 3339 (``format_timestamp``), or None for none."""
    return None if seconds is None else format_timestamp(seconds)


def listing(name: str, items: Sequence[Any], *, total: int, limit: int, offset: int
            ) -> dict[str, Any]:
    return {name: list(items), "count": len(items), "total": total, "offset": offset,
            "limit": limit}

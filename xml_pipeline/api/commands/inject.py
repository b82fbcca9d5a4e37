"""``POST /inject``: a message into the organism, answered 202 once it is durable.

JSON (``{"to", "payload", "thread_id"?, "idempotency_key"?}``) or XML (a full envelope, or a
bare payload with ``?to=``). Every input it refuses is recorded as ``MessageRejected``, with
what came of the body.

The load is on this endpoint, so it is served twice over: ``direct`` is a plain ASGI endpoint
that the guard (``api.middleware.guard``) calls in place of Starlette's routing, and
``inject`` is Starlette's route for the same endpoint (what the OpenAPI document describes).
Both answer the same, through ``_accept``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from xml_pipeline.api.requests import parse_json, pump_of
from xml_pipeline.api.responses import ApiError, JSONResponse, client_gone, encode, error_response
from xml_pipeline.errors import XmlPipelineError, XmlTooLargeError
from xml_pipeline.runtime.pump import Pump
from xml_pipeline.runtime.router import Accepted

__all__ = ["direct", "inject"]

_XML_TYPES = ("application/xml", "text/xml")
#: the request headers ``direct`` reads (the first of each, as Starlette's ``Headers.get``)
_FIELDS = frozenset({b"content-type", b"content-length", b"idempotency-key"})


async def _body(stream: AsyncIterator[bytes], declared: str | None, limit: int,
                chunks: list[bytes]) -> bytes:
    """The request body, read into ``chunks`` (so that a refusal can record what came)."""
    seen = 0
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Refused on the header: waiting for a part of the body as evidence would wait for
        # ever on a client that announces more than it sends.
        raise XmlTooLargeError(f"The request body is {declared} bytes, over the limit of "
                               f"{limit} bytes; send a smaller message.")
    async for chunk in stream:
        seen += len(chunk)
        chunks.append(chunk)
        if seen > limit:
            raise XmlTooLargeError(f"The request body is over the limit of {limit} bytes; "
                                   "send a smaller message.")
    return b"".join(chunks)


async def _stream(receive: Receive) -> AsyncIterator[bytes]:
    """The body's chunks, as Starlette's ``Request.stream`` gives them."""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            body: bytes = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


async def inject(request: Request) -> Response:
    """Send a message into the organism. JSON: ``{"to", "payload": {dict} | "<xml/>",
    "thread_id"?, "idempotency_key"?}``; or an XML body: a full envelope, or a bare payload
    with ``?to=`` (``?thread_id=``, and the ``Idempotency-Key`` header). Answers once durable.
    ---
    parameters:
      - {name: to, in: query, description: "the listener a bare XML payload is for",
         schema: {type: string}}
      - {name: thread_id, in: query, description: "the thread a bare XML payload joins",
         schema: {type: string}}
      - {name: Idempotency-Key, in: header, description: "the same key is accepted once (XML)",
         schema: {type: string}}
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            additionalProperties: false
            required: [to, payload]
            properties:
              to: {type: string, minLength: 1, description: "a listener's name"}
              payload:
                oneOf:
                  - {type: string, minLength: 1, description: "the payload as XML text"}
                  - {type: object, minProperties: 1, description: "the payload's elements"}
              thread_id: {type: string, nullable: true}
              idempotency_key: {type: string, nullable: true, minLength: 1, maxLength: 256}
          example: {to: summarizer, payload: "<Text><body>Hello</body></Text>"}
        application/xml:
          schema: {type: string, description: "a full envelope, or a bare payload with ?to="}
        text/xml:
          schema: {type: string, description: "a full envelope, or a bare payload with ?to="}
    responses:
      "202": {$ref: "#/components/responses/Injected"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "404": {$ref: "#/components/responses/NotFound"}
      "409": {$ref: "#/components/responses/Conflict"}
      "413": {$ref: "#/components/responses/TooLarge"}
      "415": {$ref: "#/components/responses/UnsupportedMediaType"}
      "422": {$ref: "#/components/responses/Unprocessable"}
      "429": {$ref: "#/components/responses/TooManyRequests"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    headers, query = request.headers, request.query_params
    accepted = await _accept(pump_of(request), request.stream(), headers.get("content-type", ""),
                             headers.get("content-length"), headers.get("idempotency-key"),
                             query.get("to"), query.get("thread_id"))
    return JSONResponse({"thread_id": accepted.thread_id, "message_id": accepted.message_id},
                        status_code=202)


async def direct(scope: Scope, receive: Receive, send: Send) -> None:
    """``inject`` as a plain ASGI endpoint: the same answers, without Starlette's request,
    routing and exception layers (about a third of a request's time under load). An
    unexpected error is raised, for the application's handler of last resort."""
    fields: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _FIELDS and name not in fields:
            fields[name] = value
    conn = HTTPConnection(scope)
    query = conn.query_params
    length = fields.get(b"content-length")
    key = fields.get(b"idempotency-key")
    try:
        accepted = await _accept(
            scope["app"].state.pump, _stream(receive),
            fields.get(b"content-type", b"").decode("latin-1"),
            None if length is None else length.decode("latin-1"),
            None if key is None else key.decode("latin-1"),
            query.get("to"), query.get("thread_id"))
    except ApiError as exc:
        await error_response(conn, exc)(scope, receive, send)
        return
    except XmlPipelineError as exc:
        await error_response(conn, ApiError.from_error(exc))(
            scope, receive, send)
        return
    except ClientDisconnect:
        await error_response(conn, client_gone())(scope, receive, send)
        return
    body = encode({"thread_id": accepted.thread_id, "message_id": accepted.message_id})
    await send({"type": "http.response.start", "status": 202,
                "headers": [(b"content-length", b"%d" % len(body)),
                            (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


async def _accept(pump: Pump, stream: AsyncIterator[bytes], content_type: str,
                  declared: str | None, key: str | None, to: str | None,
                  thread_id: str | None) -> Accepted:
    """Read, check and inject the message; raises ``ApiError`` or ``XmlPipelineError``."""
    sender = "api"
    content_type = content_type.split(";")[0].strip().lower()
    key = key or None  # an empty header is no key
    chunks: list[bytes] = []
    raw: bytes = b""
    try:
        raw = await _body(stream, declared, pump.organism.limits.max_bytes, chunks)
        if content_type == "application/json":
            data: Any = _json_request(raw)
            to, thread_id, key = data["to"], data.get("thread_id"), data.get("idempotency_key")
            payload: Any = data["payload"]
        elif content_type in _XML_TYPES:
            payload = raw
        else:
            raise ApiError("unsupported_media_type",
                           f"Content-Type {content_type or '(none)'!r} is not accepted; send "
                           "application/json or application/xml.",
                           details={"accepted": ["application/json", *_XML_TYPES]})
    except XmlPipelineError as exc:
        await pump.reject_input(exc, raw=raw or b"".join(chunks), sender=sender, to=to)
        raise
    except ApiError as exc:
        await pump.reject_input(XmlPipelineError(exc.message), raw=raw, sender=sender, to=to,
                                code=exc.code)
        raise
    return await pump.inject(payload, to=to, thread_id=thread_id, sender=sender,
                             idempotency_key=key)


def _json_request(raw: bytes) -> dict[str, Any]:
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ApiError("invalid_request", "The JSON body must be an object with 'to' and "
                                          "'payload'.")
    problems = []
    if not isinstance(data.get("to"), str) or not data.get("to"):
        problems.append("'to' (a listener name) is required")
    if not isinstance(data.get("payload"), str | dict) or not data.get("payload"):
        problems.append("'payload' (XML text or an object) is required")
    for key in ("thread_id", "idempotency_key"):
        if data.get(key) is not None and not isinstance(data[key], str):
            problems.append(f"'{key}' must be a string")
    if data.get("idempotency_key") == "":
        problems.append("'idempotency_key' must not be empty (leave it out for none)")
    unknown = sorted(set(data) - {"to", "payload", "thread_id", "idempotency_key"})
    if unknown:
        problems.append(f"unknown field(s): {', '.join(map(repr, unknown))}")
    if problems:
        raise ApiError("invalid_request", "The JSON body is not valid: " + "; ".join(problems)
                       + ".", details={"problems": problems})
    return data

"""``POST /inject``: a message into the organism, answered 202 once it is durable.

JSON (``{"to", "payload", "thread_id"?, "idempotency_key"?}``) or XML (a full envelope, or a
bare payload with ``?to=``). Every input it refuses is recorded as ``MessageRejected``, with
what came of the body.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.api.requests import parse_json, pump_of
from xml_pipeline.api.responses import ApiError, JSONResponse
from xml_pipeline.errors import XmlPipelineError, XmlTooLargeError
from xml_pipeline.pump import Pump

__all__ = ["inject"]

_XML_TYPES = ("application/xml", "text/xml")


async def _body(request: Request, pump: Pump, chunks: list[bytes]) -> bytes:
    """The request body, read into ``chunks`` (so that a refusal can record what came)."""
    limit = pump.organism.limits.max_bytes
    declared = request.headers.get("content-length")
    seen = 0
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Refused on the header: waiting for a part of the body as evidence would wait for
        # ever on a client that announces more than it sends.
        raise XmlTooLargeError(f"The request body is {declared} bytes, over the limit of "
                               f"{limit} bytes; send a smaller message.")
    async for chunk in request.stream():
        seen += len(chunk)
        chunks.append(chunk)
        if seen > limit:
            raise XmlTooLargeError(f"The request body is over the limit of {limit} bytes; "
                                   "send a smaller message.")
    return b"".join(chunks)


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
    pump = pump_of(request)
    sender = "api"
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    to = request.query_params.get("to")
    thread_id = request.query_params.get("thread_id")
    key = request.headers.get("idempotency-key") or None  # an empty header is no key
    chunks: list[bytes] = []
    raw: bytes = b""
    try:
        raw = await _body(request, pump, chunks)
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
    accepted = await pump.inject(payload, to=to, thread_id=thread_id, sender=sender,
                                 idempotency_key=key)
    return JSONResponse({"thread_id": accepted.thread_id, "message_id": accepted.message_id},
                        status_code=202)


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

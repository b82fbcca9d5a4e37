"""Write endpoints: inject, pause/resume, kill, reload, stop, usage reset, dead-letter retry.

Each acts on the running pump, and each is recorded in the log before it takes effect.
``POST /inject`` answers 202 only once the message is durable; every input it refuses is
recorded as ``MessageRejected``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from xml_pipeline.api.responses import ApiError, JSONResponse
from xml_pipeline.errors import XmlPipelineError, XmlTooLargeError
from xml_pipeline.pump import Pump
from xml_pipeline.reload import reload_organism

__all__ = ["routes"]

_XML_TYPES = ("application/xml", "text/xml")


def _pump(request: Request) -> Pump:
    pump: Pump = request.app.state.pump
    return pump


def _caller(request: Request) -> str:
    """Who did it, for the log: the client's own label if it sent a sane one."""
    label = request.headers.get("x-client-name", "api")
    return label if label.replace("-", "").replace("_", "").isalnum() and len(label) <= 64 \
        else "api"


async def _body(request: Request, pump: Pump) -> bytes:
    limit = pump.organism.limits.max_bytes
    declared = request.headers.get("content-length")
    chunks: list[bytes] = []
    seen = 0
    if declared is not None and declared.isdigit() and int(declared) > limit:
        async for chunk in request.stream():  # keep the first part, as evidence for the log
            chunks.append(chunk)
            if sum(map(len, chunks)) >= 4096:
                break
        raise XmlTooLargeError(f"The request body is {declared} bytes, over the limit of "
                               f"{limit} bytes; send a smaller message.")
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise XmlTooLargeError(f"The request body is over the limit of {limit} bytes; "
                                   "send a smaller message.")
        chunks.append(chunk)
    return b"".join(chunks)


async def inject(request: Request) -> Response:
    """Send a message into the organism. JSON: ``{"to", "payload": {dict} | "<xml/>",
    "thread_id"?, "idempotency_key"?}``; or an XML body: a full envelope, or a bare payload
    with ``?to=`` (``?thread_id=``, and the ``Idempotency-Key`` header). Answers once durable.
    ---
    parameters:
      - {name: to, in: query, schema: {type: string}}
      - {name: thread_id, in: query, schema: {type: string}}
      - {name: Idempotency-Key, in: header, schema: {type: string}}
    requestBody:
      content:
        application/json:
          schema:
            type: object
            required: [to, payload]
            properties:
              to: {type: string}
              payload: {oneOf: [{type: string}, {type: object}]}
              thread_id: {type: string}
              idempotency_key: {type: string}
        application/xml: {schema: {type: string}}
    responses:
      "202": {description: "accepted and durable: {thread_id, message_id}"}
      "400": {description: "malformed or hostile XML, bad JSON, bad envelope"}
      "404": {description: "unknown listener"}
      "409": {description: "the thread was killed"}
      "413": {description: "body too large"}
      "415": {description: "unsupported content type"}
      "422": {description: "payload does not match the listener's schema"}
      "429": {description: "the listener's mailbox is full; retry after Retry-After"}
      "503": {description: "stopping, or the log cannot be written"}
    """
    pump = _pump(request)
    sender = "api"
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    to = request.query_params.get("to")
    thread_id = request.query_params.get("thread_id")
    key = request.headers.get("idempotency-key")
    raw: bytes = b""
    try:
        raw = await _body(request, pump)
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
        await pump.reject_input(exc, raw=raw, sender=sender, to=to)
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
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_json", f"The body is not valid JSON: {exc}.") from exc
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
    unknown = sorted(set(data) - {"to", "payload", "thread_id", "idempotency_key"})
    if unknown:
        problems.append(f"unknown field(s): {', '.join(unknown)}")
    if problems:
        raise ApiError("invalid_request", "The JSON body is not valid: " + "; ".join(problems)
                       + ".", details={"problems": problems})
    return data


async def pause(request: Request) -> Response:
    """Pause an agent: it receives nothing until resumed; its messages wait in order.
    ---
    parameters: [{name: name, in: path, required: true, schema: {type: string}}]
    responses: {"200": {description: "{success, agent, state}"},
                "404": {description: "no such agent"}}
    """
    name = request.path_params["name"]
    state = await _pump(request).pause(name, by=_caller(request))
    return JSONResponse({"success": True, "agent": name, "state": state})


async def resume(request: Request) -> Response:
    """Resume a paused agent; its waiting messages are delivered in order.
    ---
    parameters: [{name: name, in: path, required: true, schema: {type: string}}]
    responses: {"200": {description: "{success, agent, state}"},
                "404": {description: "no such agent"}}
    """
    name = request.path_params["name"]
    state = await _pump(request).resume(name, by=_caller(request))
    return JSONResponse({"success": True, "agent": name, "state": state})


async def kill(request: Request) -> Response:
    """Kill a thread: drop its queued messages, cancel its handlers, accept nothing more.
    ---
    parameters: [{name: thread_id, in: path, required: true, schema: {type: string}}]
    responses: {"200": {description: "{success, thread_id}"},
                "404": {description: "no such thread"}}
    """
    thread_id = request.path_params["thread_id"]
    if not await _pump(request).kill_thread(thread_id, by=_caller(request)):
        raise ApiError("not_found", f"There is no thread {thread_id!r}.",
                       details={"thread_id": thread_id})
    return JSONResponse({"success": True, "thread_id": thread_id})


async def reload(request: Request) -> Response:
    """Reload organism.yaml: validate fully, then swap; a bad file changes nothing.
    ---
    responses: {"200": {description: "{success, added, removed, updated, error}"},
                "422": {description: "the new organism is not valid; the old one still runs"}}
    """
    result = await reload_organism(_pump(request))
    body = {"success": result.success, "added": list(result.added),
            "removed": list(result.removed), "updated": list(result.updated),
            "changes": result.changes, "error": result.error}
    return JSONResponse(body, status_code=200 if result.success else 422)


async def stop(request: Request) -> Response:
    """Stop the organism gracefully (in-flight handlers finish, then the server exits).
    ---
    responses: {"202": {description: "{success}"}}
    """
    request.app.state.stop.set()
    return JSONResponse({"success": True}, status_code=202)


async def usage_reset(request: Request) -> Response:
    """Restart the usage totals (recorded as UsageReset; budgets and history are kept).
    ---
    responses: {"200": {description: "{success}"}}
    """
    await _pump(request).reset_usage(by=_caller(request))
    return JSONResponse({"success": True})


async def retry(request: Request) -> Response:
    """Deliver a dead-lettered message again.
    ---
    parameters: [{name: message_id, in: path, required: true, schema: {type: string}}]
    responses: {"200": {description: "{success, message_id}"},
                "404": {description: "not a dead letter"}}
    """
    message_id = request.path_params["message_id"]
    if not await _pump(request).retry_dead_letter(message_id, by=_caller(request)):
        raise ApiError("not_found", f"{message_id!r} is not a dead letter; GET "
                                    "/api/v1/dead-letters lists them.",
                       details={"message_id": message_id})
    return JSONResponse({"success": True, "message_id": message_id})


routes = [
    Route("/inject", inject, methods=["POST"]),
    Route("/agents/{name}/pause", pause, methods=["POST"]),
    Route("/agents/{name}/resume", resume, methods=["POST"]),
    Route("/threads/{thread_id}/kill", kill, methods=["POST"]),
    Route("/organism/reload", reload, methods=["POST"]),
    Route("/organism/stop", stop, methods=["POST"]),
    Route("/usage/reset", usage_reset, methods=["POST"]),
    Route("/dead-letters/{message_id}/retry", retry, methods=["POST"]),
]

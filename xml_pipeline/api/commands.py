"""Write endpoints: inject, pause/resume, kill, reload, stop, usage reset, dead-letter retry,
and setting a budget (a thread's, an agent's in a thread, an agent's, the organism's).

Each acts on the running pump, and each is recorded in the log before it takes effect.
``POST /inject`` answers 202 only once the message is durable; every input it refuses is
recorded as ``MessageRejected``.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from xml_pipeline.api import budgets as budget_views
from xml_pipeline.api import views
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
    pump = _pump(request)
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
    data = _parse_json(raw)
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


def _parse_json(raw: bytes) -> Any:
    """The JSON document in ``raw``; raises ``ApiError("invalid_json")`` saying what is wrong
    and where. Its strings are Unicode text: a lone surrogate escape (``"\\ud800"``) is refused
    here, since the log could not store it nor a response carry it."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError("invalid_json",
                       f"The body is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                       f"{exc.colno}; send one JSON object with 'to' and 'payload'.",
                       details={"line": exc.lineno, "column": exc.colno}) from exc
    except UnicodeDecodeError as exc:
        raise ApiError("invalid_json",
                       f"The body is not valid JSON: byte {exc.object[exc.start]:#04x} at "
                       f"offset {exc.start} is not {exc.encoding}; send the JSON in UTF-8.",
                       details={"offset": exc.start}) from exc
    except RecursionError as exc:
        raise ApiError("invalid_json",
                       "The body is not valid JSON: its arrays or objects nest too deeply to "
                       "parse; send a flatter document.") from exc
    except ValueError as exc:  # a number with more digits than int() converts
        raise ApiError("invalid_json",
                       f"The body has a number of more than {sys.get_int_max_str_digits()} "
                       "digits; send it as a string.") from exc
    where = _lone_surrogate(data)
    if where is not None:
        raise ApiError("invalid_json",
                       f"The JSON body has a lone surrogate (an escape from \\ud800 to \\udfff "
                       f"without its pair) in {where}; send valid Unicode text.",
                       details={"field": where})
    return data


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(data: Any) -> str | None:
    """Where a string or key holding a lone surrogate is in ``data`` (``'payload.n[0]'``, ``the
    key 'payload.x'``, ``the body``), or None. Iterative: the document may nest deeply."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        place, value = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            return f"'{place}'" if place else "the body"
        if isinstance(value, dict):
            for key, item in value.items():
                name = key.encode("utf-8", "backslashreplace").decode("utf-8")
                inner = f"{place}.{name}" if place else name
                if _SURROGATE.search(key):
                    return f"the key '{inner}'"
                stack.append((inner, item))
        elif isinstance(value, list):
            stack.extend((f"{place}[{index}]", item) for index, item in enumerate(value))
    return None


async def pause(request: Request) -> Response:
    """Pause an agent: it receives nothing until resumed; its messages wait in order.
    ---
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {$ref: "#/components/parameters/client_name"}
    responses:
      "200": {$ref: "#/components/responses/AgentState"}
      "404": {$ref: "#/components/responses/NotFound"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    name = request.path_params["name"]
    state = await _pump(request).pause(name, by=_caller(request))
    return JSONResponse({"success": True, "agent": name, "state": state})


async def resume(request: Request) -> Response:
    """Resume a paused agent; its waiting messages are delivered in order.
    ---
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {$ref: "#/components/parameters/client_name"}
    responses:
      "200": {$ref: "#/components/responses/AgentState"}
      "404": {$ref: "#/components/responses/NotFound"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    name = request.path_params["name"]
    state = await _pump(request).resume(name, by=_caller(request))
    return JSONResponse({"success": True, "agent": name, "state": state})


async def kill(request: Request) -> Response:
    """Kill a thread: drop its queued messages, cancel its handlers, accept nothing more.
    ---
    parameters:
      - {$ref: "#/components/parameters/thread_id"}
      - {$ref: "#/components/parameters/client_name"}
    responses:
      "200": {$ref: "#/components/responses/Killed"}
      "404": {$ref: "#/components/responses/NotFound"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    thread_id = request.path_params["thread_id"]
    pump = _pump(request)
    if not await pump.kill_thread(thread_id, by=_caller(request)):
        raise views.no_thread(pump, thread_id)
    return JSONResponse({"success": True, "thread_id": thread_id})


async def reload(request: Request) -> Response:
    """Reload organism.yaml: validate fully, then swap; a bad file changes nothing.
    ---
    responses:
      "200": {$ref: "#/components/responses/Reloaded"}
      "422":
        description: "the new organism is not valid; the old one still runs"
        content: {application/json: {schema: {$ref: "#/components/schemas/Reloaded"}}}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    result = await reload_organism(_pump(request))
    body = {"success": result.success, "added": list(result.added),
            "removed": list(result.removed), "updated": list(result.updated),
            "changes": result.changes, "error": result.error,
            "restart_needed": list(result.restart_needed), "settings": list(result.settings)}
    return JSONResponse(body, status_code=200 if result.success else 422)


async def stop(request: Request) -> Response:
    """Stop the organism gracefully (in-flight handlers finish, then the server exits).
    ---
    responses:
      "202": {$ref: "#/components/responses/Success"}
    """
    request.app.state.stop.set()
    return JSONResponse({"success": True}, status_code=202)


async def usage_reset(request: Request) -> Response:
    """Restart the usage totals (recorded as UsageReset; budgets and history are kept).
    ---
    parameters: [{$ref: "#/components/parameters/client_name"}]
    responses:
      "200": {$ref: "#/components/responses/Success"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    await _pump(request).reset_usage(by=_caller(request))
    return JSONResponse({"success": True})


async def retry(request: Request) -> Response:
    """Deliver a dead-lettered message again.
    ---
    parameters:
      - {name: message_id, in: path, required: true, schema: {type: string}}
      - {$ref: "#/components/parameters/client_name"}
    responses:
      "200": {$ref: "#/components/responses/Retried"}
      "404": {$ref: "#/components/responses/NotFound"}
      "409": {$ref: "#/components/responses/Conflict"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    message_id = request.path_params["message_id"]
    if not await _pump(request).retry_dead_letter(message_id, by=_caller(request)):
        raise ApiError("not_found", f"{message_id!r} is not a dead letter; GET "
                                    "/api/v1/dead-letters lists them.",
                       details={"message_id": message_id})
    return JSONResponse({"success": True, "message_id": message_id})


_MAX_TOKENS = 10**12


async def _budget_body(request: Request, *, agent: bool) -> tuple[int, str | None]:
    """``(max_tokens, agent)`` of a budget body; raises 415 or 400 saying what is wrong."""
    shape = '{"max_tokens": N} or {"max_tokens": N, "agent": NAME}' if agent \
        else '{"max_tokens": N}'
    if request.headers.get("content-type", "").split(";")[0].strip().lower() \
            != "application/json":
        raise ApiError("unsupported_media_type",
                       f"Send the budget as application/json: {shape}.")
    data = _parse_json(await request.body())
    allowed = {"max_tokens", "agent"} if agent else {"max_tokens"}
    if not isinstance(data, dict) or "max_tokens" not in data or set(data) - allowed:
        raise ApiError("invalid_request", f"The body must be {shape}.")
    value = data["max_tokens"]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_TOKENS:
        raise ApiError("invalid_request", f"max_tokens must be a whole number from 1 to "
                                          f"10^12, not {json.dumps(value)[:40]}.")
    name = data.get("agent")
    if name is not None and not isinstance(name, str):
        raise ApiError("invalid_request", "agent must be the name of an agent, as a string; "
                                          "GET /api/v1/agents lists them.")
    return value, name


def _agent(pump: Pump, name: str) -> None:
    listener = pump.organism.listeners.get(name)
    if listener is None or listener.agent is None:
        what = "no agent" if listener is None else "no LLM agent (a handler has no budget)"
        raise ApiError("not_found", f"There is {what} {name!r}; GET /api/v1/agents lists "
                                    "them.", details={"agent": name})


async def thread_budget(request: Request) -> Response:
    """Set a thread's token budget, or with ``agent`` that agent's budget in the thread
    (recorded as BudgetRaised). A waiting call it frees goes on at once; if a budget still
    holds the thread, ``still_held_by`` says which and how to raise it.
    ---
    parameters:
      - {$ref: "#/components/parameters/thread_id"}
      - {$ref: "#/components/parameters/client_name"}
    requestBody:
      required: true
      content:
        application/json:
          schema:
            type: object
            required: [max_tokens]
            additionalProperties: false
            properties:
              max_tokens: {type: integer, minimum: 1, maximum: 1000000000000}
              agent: {type: string, description: "set this agent's budget in the thread"}
    responses:
      "200": {$ref: "#/components/responses/ThreadBudgetSet"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "404": {$ref: "#/components/responses/NotFound"}
      "413": {$ref: "#/components/responses/TooLarge"}
      "415": {$ref: "#/components/responses/UnsupportedMediaType"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    pump = _pump(request)
    thread_id = request.path_params["thread_id"]
    value, agent = await _budget_body(request, agent=True)
    if thread_id not in pump.state.threads.threads:
        raise views.no_thread(pump, thread_id)
    before = [thread_id] if thread_id in pump.state.budgets.holds else []
    if agent is None:
        await pump.raise_budget("thread", thread_id, value, by=_caller(request))
    else:
        _agent(pump, agent)
        await pump.raise_budget("thread-agent", f"{thread_id}|{agent}", value,
                                by=_caller(request))
    body = budget_views.thread_budget(pump, thread_id)
    body["still_held_by"] = body["stopped_by"]
    body["resumed"] = budget_views.still_held(pump, before, thread_id=thread_id)["resumed"]
    return JSONResponse(body)


async def agent_budget(request: Request) -> Response:
    """Set an agent's token budget across all threads (recorded as BudgetRaised). The
    waiting calls it frees go on at once; ``still_held`` lists those a budget still holds.
    ---
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {$ref: "#/components/parameters/client_name"}
    requestBody: {$ref: "#/components/requestBodies/MaxTokens"}
    responses:
      "200": {$ref: "#/components/responses/AgentBudgetSet"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "404": {$ref: "#/components/responses/NotFound"}
      "413": {$ref: "#/components/responses/TooLarge"}
      "415": {$ref: "#/components/responses/UnsupportedMediaType"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    pump = _pump(request)
    name = request.path_params["name"]
    value, _ = await _budget_body(request, agent=False)
    _agent(pump, name)
    before = list(pump.state.budgets.holds)
    await pump.raise_budget("agent", name, value, by=_caller(request))
    return JSONResponse({**views.agent_usage(pump, name),
                         **budget_views.still_held(pump, before)})


async def organism_budget(request: Request) -> Response:
    """Set the organism's token budget (all agents, all threads; recorded as BudgetRaised).
    The waiting calls it frees go on at once; ``still_held`` lists those a budget still holds.
    ---
    parameters:
      - {$ref: "#/components/parameters/client_name"}
    requestBody: {$ref: "#/components/requestBodies/MaxTokens"}
    responses:
      "200": {$ref: "#/components/responses/OrganismBudgetSet"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "413": {$ref: "#/components/responses/TooLarge"}
      "415": {$ref: "#/components/responses/UnsupportedMediaType"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    pump = _pump(request)
    value, _ = await _budget_body(request, agent=False)
    before = list(pump.state.budgets.holds)
    await pump.raise_budget("organism", pump.organism.name, value, by=_caller(request))
    return JSONResponse({"organism": pump.organism.name,
                         "budget": budget_views.budget_summary(pump.state.budgets.organism),
                         **budget_views.still_held(pump, before)})


routes = [
    Route("/inject", inject, methods=["POST"]),
    Route("/agents/{name}/pause", pause, methods=["POST"]),
    Route("/agents/{name}/resume", resume, methods=["POST"]),
    Route("/threads/{thread_id}/kill", kill, methods=["POST"]),
    Route("/organism/reload", reload, methods=["POST"]),
    Route("/organism/stop", stop, methods=["POST"]),
    Route("/usage/reset", usage_reset, methods=["POST"]),
    Route("/usage/threads/{thread_id}/budget", thread_budget, methods=["POST"]),
    Route("/usage/agents/{name}/budget", agent_budget, methods=["POST"]),
    Route("/usage/organism/budget", organism_budget, methods=["POST"]),
    Route("/dead-letters/{message_id}/retry", retry, methods=["POST"]),
]

"""The OpenAPI document of the API, served at ``GET /api/v1/openapi.json``.

Each endpoint documents itself in its docstring, so that the code and its document are one
text: its first sentence is the operation's summary, its prose the description, and the YAML
after ``---`` (Starlette's ``SchemaGenerator``) holds the parameters, the request body and
every status the endpoint itself answers, referring to the shapes below by ``$ref``. What every
operation shares is added here: its ``operationId`` (``OPERATION_IDS``), the answers of the
guards and the router in front of it (``GUARDS``: 401 without the token, 403 from another
site, 404 for a path parameter no route takes, 413 for a body over the limit, 503 while
``organism.api.max_requests`` requests are in progress), and
the ``X-Request-ID`` header on every answer. ``tests/test_openapi.py`` checks the document
against the routes and against a real server, and generates a client from it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from starlette.routing import BaseRoute
from starlette.schemas import SchemaGenerator

import xml_pipeline
from xml_pipeline.api.shapes import SCHEMAS

__all__ = ["document"]

_COMPONENTS = yaml.safe_load("""
securitySchemes:
  bearer: {type: http, scheme: bearer}

parameters:
  limit:
    {name: limit, in: query, description: "page size", schema: {type: integer, minimum: 1,
     maximum: 1000, default: 50}}
  offset:
    {name: offset, in: query, description: "items to skip",
     schema: {type: integer, minimum: 0, maximum: 4611686018427387904, default: 0}}
  agent:
    {name: name, in: path, required: true, description: "a listener's name",
     schema: {type: string}}
  thread_id:
    {name: thread_id, in: path, required: true, schema: {type: string}}
  client_name:
    {name: X-Client-Name, in: header, schema: {type: string},
     description: "who acts, as recorded in the log (letters, digits, - and _; at most 64);
       'api' otherwise"}

requestBodies:
  MaxTokens:
    required: true
    content:
      application/json:
        schema:
          type: object
          required: [max_tokens]
          additionalProperties: false
          properties:
            max_tokens: {type: integer, minimum: 1, maximum: 1000000000000}

headers:
  WWW-Authenticate:
    schema: {type: string}
  X-Request-ID:
    description: the client's own X-Request-ID if it sent a sane one, else a fresh one
    schema: {type: string}
  Retry-After:
    description: seconds to wait before trying again
    schema: {type: string, pattern: '^[0-9]+$'}
""")


_REQUEST_ID = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}


def _json(schema: str, description: str, *, retry_after: bool = False) -> dict[str, Any]:
    headers = dict(_REQUEST_ID)
    if retry_after:
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return {"description": description, "headers": headers,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _error(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    return _json("Error", description, retry_after=retry_after)


_COMPONENTS["schemas"] = SCHEMAS
_COMPONENTS["responses"] = {
    # Errors, by the name of their status.
    "BadRequest": _error("the request is not valid: a query parameter, the body, the XML"),
    "Unauthorized": _error("no valid 'Authorization: Bearer <token>' header"),
    "Forbidden": _error("no token is set, and the request comes from a page of another site "
                        "(its Origin) or names a Host that is not this machine"),
    "NotFound": _error("no such thing (its id is in details)"),
    "NoRoute": _error("no route takes this path: a path parameter holds a character that no "
                      "route matches (a line break)"),
    "Conflict": _error("the thread is closed"),
    "TooLarge": _error("the body is over the size limit"),
    "BodyTimeout": _error("the body did not arrive within organism.api.body_timeout"),
    "UnsupportedMediaType": _error("the Content-Type is not JSON or XML"),
    "Unprocessable": _error("the payload does not fit the listener's schema"),
    "TooManyRequests": _error("the listener's mailbox is full; retry after Retry-After",
                              retry_after=True),
    "Unavailable": _error("too many requests in progress (organism.api.max_requests), the "
                          "organism is stopping, or its log cannot be written; retry after "
                          "Retry-After", retry_after=True),
    # Answers, by the name of their shape.
    **{name: _json(name, text) for name, text in [
        ("Organism", "name, status, log position, reload counters"),
        ("OrganismConfig", "path, digest and YAML source"),
        ("OrganismState", "the fingerprint of the live state"),
        ("Capabilities", "one page of capabilities"),
        ("Capability", "a capability with its XSD and an example payload"),
        ("Agents", "one page of agents"),
        ("Agent", "an agent's state and counters"),
        ("AgentConfig", "the listener's configuration"),
        ("Threads", "one page of threads"),
        ("Thread", "a thread"),
        ("Messages", "one page of messages"),
        ("DeadLetters", "one page of dead letters"),
        ("Usage", "token usage: totals, by agent, by model"),
        ("ThreadBudgets", "one page of thread budgets"),
        ("ThreadBudget", "a thread's token budget"),
        ("AgentUsage", "an agent's usage and budget"),
        ("ThreadBudgetSet", "the thread's budget view, and what still holds it"),
        ("AgentBudgetSet", "the agent's budget, the threads that go on and those still held"),
        ("OrganismBudgetSet", "the organism's budget, the threads that go on and those "
                              "still held"),
        ("ModelUsage", "a model's usage"),
        ("Injected", "accepted and durable"),
        ("AgentState", "the agent's new state"),
        ("Killed", "the thread is killed"),
        ("Retried", "the message is delivered again"),
        ("Reloaded", "what the reload changed"),
        ("Success", "done"),
    ]},
}

_COMPONENTS["responses"]["Unauthorized"]["headers"]["WWW-Authenticate"] = {
    "$ref": "#/components/headers/WWW-Authenticate"}

_BASE: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "xml-pipeline", "version": xml_pipeline.__version__,
             "description": "Introspection, injection, control and live tail of a running "
                            "xml-pipeline organism. Errors are always "
                            "{\"error\": {code, message, details, request_id}}."},
    "servers": [{"url": "/api/v1"}],
    "components": _COMPONENTS,
    "security": [{"bearer": []}],
}

#: A name for each operation, by ``"METHOD /path"``, for generated clients. An operation left
#: out gets one made of its method and its endpoint's name (and tests/test_openapi.py fails).
OPERATION_IDS: dict[str, str] = {
    "GET /organism": "getOrganism",
    "GET /organism/config": "getOrganismConfig",
    "GET /organism/state": "getOrganismState",
    "POST /organism/reload": "reloadOrganism",
    "POST /organism/stop": "stopOrganism",
    "GET /capabilities": "listCapabilities",
    "GET /capabilities/{name}": "getCapability",
    "GET /agents": "listAgents",
    "GET /agents/{name}": "getAgent",
    "GET /agents/{name}/config": "getAgentConfig",
    "GET /agents/{name}/schema": "getAgentSchema",
    "POST /agents/{name}/pause": "pauseAgent",
    "POST /agents/{name}/resume": "resumeAgent",
    "GET /threads": "listThreads",
    "GET /threads/{thread_id}": "getThread",
    "GET /threads/{thread_id}/messages": "listThreadMessages",
    "POST /threads/{thread_id}/kill": "killThread",
    "GET /messages": "listMessages",
    "POST /inject": "inject",
    "GET /dead-letters": "listDeadLetters",
    "POST /dead-letters/{message_id}/retry": "retryDeadLetter",
    "GET /usage": "getUsage",
    "POST /usage/reset": "resetUsage",
    "GET /usage/threads": "listThreadBudgets",
    "GET /usage/threads/{thread_id}": "getThreadBudget",
    "POST /usage/threads/{thread_id}/budget": "raiseThreadBudget",
    "GET /usage/agents/{name}": "getAgentUsage",
    "POST /usage/agents/{name}/budget": "raiseAgentBudget",
    "POST /usage/organism/budget": "raiseOrganismBudget",
    "GET /usage/models/{model}": "getModelUsage",
    "GET /events": "streamEvents",
}

_UNCOUNTED = ("/events",)  # not counted against organism.api.max_requests

#: What the guards in front of every endpoint (``middleware/``) and the router may answer instead
#: of it: status, response and the paths it applies to. An endpoint's own answer with the same
#: status comes first.
GUARDS: list[tuple[str, str, Callable[[str], bool]]] = [
    ("401", "Unauthorized", lambda path: True),  # a token is set and not given
    ("403", "Forbidden", lambda path: True),  # no token, and another site or host asks
    ("404", "NoRoute", lambda path: "{" in path),  # a path parameter no route takes
    ("408", "BodyTimeout", lambda path: path not in _UNCOUNTED),  # a body too slow to come
    ("413", "TooLarge", lambda path: True),  # Content-Length over limits.max_bytes
    ("503", "Unavailable", lambda path: path not in _UNCOUNTED),  # max_requests in progress
]


def _prose(func: Callable[..., Any]) -> tuple[str, str]:
    """The summary (first sentence) and description (all of it) of an endpoint's docstring."""
    text = inspect.cleandoc((func.__doc__ or "").split("---", 1)[0])
    description = "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))
    summary = description.split("\n", 1)[0].split(". ", 1)[0].rstrip(".")
    return summary, description


def _camel(words: str) -> str:
    first, *rest = words.split("_")
    return first + "".join(word.capitalize() for word in rest)


def document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (a fresh dict: callers may change it).

    Each operation is its endpoint's docstring: the YAML after ``---``, its first sentence as
    the summary and its prose as the description, with its name from ``OPERATION_IDS`` and
    the ``GUARDS`` responses added. An endpoint without YAML is left out."""
    schema = copy.deepcopy(_BASE)
    paths: dict[str, dict[str, Any]] = schema.setdefault("paths", {})
    generator = SchemaGenerator({})
    for endpoint in generator.get_endpoints(list(routes)):
        parsed = generator.parse_docstring(endpoint.func)
        if not parsed:
            continue
        label = f"{endpoint.http_method.upper()} {endpoint.path}"
        summary, description = _prose(endpoint.func)
        operation: dict[str, Any] = {
            "operationId": OPERATION_IDS.get(label)
            or _camel(f"{endpoint.http_method}_{endpoint.func.__name__}"),
            "summary": summary, "description": description, **parsed}
        responses: dict[str, Any] = operation.setdefault("responses", {})
        for status, name, applies in GUARDS:
            if applies(endpoint.path):
                responses.setdefault(status, {"$ref": f"#/components/responses/{name}"})
        for response in responses.values():
            if "$ref" not in response:
                response.setdefault("headers", {}).update(copy.deepcopy(_REQUEST_ID))
        operation["responses"] = dict(sorted(responses.items()))
        paths.setdefault(endpoint.path, {})[endpoint.http_method] = operation
    return schema

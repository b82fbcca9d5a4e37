"""The OpenAPI document of the API, served at ``GET /api/v1/openapi.json``.

Each endpoint documents itself in the YAML after ``---`` in its docstring (Starlette's
``SchemaGenerator``): parameters, request body and every status it answers, referring to the
shapes below by ``$ref``. What every operation shares is added here: the bearer token (so a 401
on each operation), the 503 of a server with ``organism.api.max_requests`` requests in
progress (every operation but the event stream), and the ``X-Request-ID`` header on every
answer.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml
from starlette.routing import BaseRoute
from starlette.schemas import SchemaGenerator

import xml_pipeline

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

headers:
  WWW-Authenticate:
    schema: {type: string}
  X-Request-ID:
    description: the client's own X-Request-ID if it sent a sane one, else a fresh one
    schema: {type: string}
  Retry-After:
    description: seconds to wait before trying again
    schema: {type: string, pattern: '^[0-9]+$'}

schemas:
  Error:
    type: object
    additionalProperties: false
    required: [error]
    properties:
      error:
        type: object
        additionalProperties: false
        required: [code, message, details, request_id]
        properties:
          code: {type: string}
          message: {type: string}
          details: {}
          request_id: {type: string, nullable: true}
  Page:
    type: object
    required: [count, total, offset, limit]
    properties:
      count: {type: integer, minimum: 0}
      total: {type: integer, minimum: 0}
      offset: {type: integer, minimum: 0}
      limit: {type: integer, minimum: 1}
  Time: {type: string, nullable: true, description: RFC 3339 timestamp}
  Names: {type: array, items: {type: string}}

  Organism:
    type: object
    required: [name, digest, status, path, started_at, loaded_at, position, listeners, reloads,
               reloads_rejected, last_reload_error]
    properties:
      name: {type: string}
      digest: {type: string}
      status: {type: string, enum: [new, running, stopped]}
      path: {type: string}
      started_at: {$ref: '#/components/schemas/Time'}
      loaded_at: {$ref: '#/components/schemas/Time'}
      position: {type: integer, minimum: 0}
      listeners: {type: integer, minimum: 0}
      reloads: {type: integer, minimum: 0}
      reloads_rejected: {type: integer, minimum: 0}
      last_reload_error: {type: string, nullable: true}
  OrganismConfig:
    type: object
    required: [path, digest, source]
    properties:
      path: {type: string}
      digest: {type: string}
      source: {type: string}
  OrganismState:
    type: object
    required: [position, digest, idle]
    properties:
      position: {type: integer, minimum: 0}
      digest: {type: string}
      idle: {type: boolean}

  Capability:
    type: object
    required: [name, description, kind, payload_type, payload_namespace, peers]
    properties:
      name: {type: string}
      description: {type: string}
      kind: {type: string, enum: [agent, handler]}
      payload_type: {type: string}
      payload_namespace: {type: string, nullable: true}
      peers: {$ref: '#/components/schemas/Names'}
      schema: {type: string}
      example: {type: string}
  Capabilities:
    allOf:
      - $ref: '#/components/schemas/Page'
      - type: object
        required: [capabilities]
        properties:
          capabilities: {type: array, items: {$ref: '#/components/schemas/Capability'}}
  Agent:
    type: object
    required: [name, description, kind, state, paused_by, paused_at, queued, in_flight,
               accepted, rejected, delivered, succeeded, failed, dead_lettered, last_active_at]
    properties:
      name: {type: string}
      description: {type: string}
      kind: {type: string, enum: [agent, handler]}
      state: {type: string, enum: [running, paused, removed]}
      paused_by: {type: string, nullable: true}
      paused_at: {$ref: '#/components/schemas/Time'}
      queued: {type: integer, minimum: 0}
      in_flight: {type: integer, minimum: 0}
      accepted: {type: integer, minimum: 0}
      rejected: {type: integer, minimum: 0}
      delivered: {type: integer, minimum: 0}
      succeeded: {type: integer, minimum: 0}
      failed: {type: integer, minimum: 0}
      dead_lettered: {type: integer, minimum: 0}
      last_active_at: {$ref: '#/components/schemas/Time'}
      model: {type: string, nullable: true, description: the LLM model of an agent}
      error:
        type: string
        nullable: true
        description: why the agent cannot work now (no API key), or null
  Agents:
    allOf:
      - $ref: '#/components/schemas/Page'
      - type: object
        required: [agents]
        properties:
          agents: {type: array, items: {$ref: '#/components/schemas/Agent'}}
  AgentConfig:
    type: object
    required: [name, description, payload, payload_type, handler, peers, concurrency, timeout,
               retries, budget]
    properties:
      name: {type: string}
      description: {type: string}
      payload: {type: string}
      payload_type: {type: string}
      payload_namespace: {type: string, nullable: true}
      handler: {type: string, nullable: true}
      agent: {type: object, nullable: true}
      peers: {$ref: '#/components/schemas/Names'}
      concurrency: {type: integer, minimum: 1}
      timeout: {type: number}
      retries: {type: object}
      budget: {type: object}

  Thread:
    type: object
    required: [thread_id, status, created_at, updated_at, root_message_id, message_count,
               open_messages, dead_letters, rejected, participants, killed_by]
    properties:
      thread_id: {type: string}
      status: {type: string, enum: [active, completed, failed, killed, paused]}
      created_at: {$ref: '#/components/schemas/Time'}
      updated_at: {$ref: '#/components/schemas/Time'}
      root_message_id: {type: string}
      message_count: {type: integer, minimum: 0}
      open_messages: {type: integer, minimum: 0}
      dead_letters: {type: integer, minimum: 0}
      rejected: {type: integer, minimum: 0}
      participants: {$ref: '#/components/schemas/Names'}
      killed_by: {type: string, nullable: true}
  Threads:
    allOf:
      - $ref: '#/components/schemas/Page'
      - type: object
        required: [threads]
        properties:
          threads: {type: array, items: {$ref: '#/components/schemas/Thread'}}
  Message:
    type: object
    required: [message_id, thread_id, parent_id, sender, to, payload_type, accepted_at,
               position, status, envelope]
    properties:
      message_id: {type: string}
      thread_id: {type: string}
      parent_id: {type: string, nullable: true}
      sender: {type: string}
      to: {type: string}
      payload_type: {type: string}
      accepted_at: {$ref: '#/components/schemas/Time'}
      position: {type: integer, minimum: 1}
      status: {type: string}
      envelope: {type: string}
  Messages:
    allOf:
      - $ref: '#/components/schemas/Page'
      - type: object
        required: [messages]
        properties:
          messages: {type: array, items: {$ref: '#/components/schemas/Message'}}
  DeadLetters:
    allOf:
      - $ref: '#/components/schemas/Page'
      - type: object
        required: [dead_letters]
        properties:
          dead_letters:
            type: array
            items:
              type: object
              required: [message_id, reason, thread_id, listener, sender, attempts, accepted_at]
              properties:
                message_id: {type: string}
                reason: {type: string}
                thread_id: {type: string, nullable: true}
                listener: {type: string, nullable: true}
                sender: {type: string, nullable: true}
                attempts: {type: integer, minimum: 0}
                accepted_at: {$ref: '#/components/schemas/Time'}

  UsageTotals:
    type: object
    required: [total_tokens, prompt_tokens, completion_tokens, request_count, total_cost,
               avg_latency_ms]
    properties:
      total_tokens: {type: integer, minimum: 0}
      prompt_tokens: {type: integer, minimum: 0}
      completion_tokens: {type: integer, minimum: 0}
      request_count: {type: integer, minimum: 0}
      total_cost: {type: number, minimum: 0}
      avg_latency_ms: {type: number, minimum: 0}
  Usage:
    type: object
    required: [usage]
    properties:
      usage:
        type: object
        required: [totals, by_agent, by_model, active_threads, since]
        properties:
          totals: {$ref: '#/components/schemas/UsageTotals'}
          by_agent: {type: object, additionalProperties: {$ref: '#/components/schemas/UsageTotals'}}
          by_model: {type: object, additionalProperties: {$ref: '#/components/schemas/UsageTotals'}}
          active_threads: {type: integer, minimum: 0}
          since: {$ref: '#/components/schemas/Time'}
  ThreadBudget:
    type: object
    required: [thread_id, max_tokens, prompt_tokens, completion_tokens, total_tokens,
               remaining, percent_used, is_exhausted]
    properties:
      thread_id: {type: string}
      max_tokens: {type: integer, nullable: true}
      prompt_tokens: {type: integer, minimum: 0}
      completion_tokens: {type: integer, minimum: 0}
      total_tokens: {type: integer, minimum: 0}
      reserved_tokens: {type: integer, minimum: 0}
      remaining: {type: integer, nullable: true, minimum: 0}
      percent_used: {type: number, minimum: 0}
      is_exhausted: {type: boolean}
      warning:
        type: integer
        nullable: true
        enum: [75, 90, 95, null]
        description: the highest warning level crossed (percent), or null
  ThreadBudgets:
    allOf:
      - $ref: '#/components/schemas/Page'
      - type: object
        required: [threads, default_max_tokens]
        properties:
          threads: {type: array, items: {$ref: '#/components/schemas/ThreadBudget'}}
          default_max_tokens: {type: integer, nullable: true}
  AgentUsage:
    allOf:
      - $ref: '#/components/schemas/UsageTotals'
      - type: object
        required: [agent, budget]
        properties:
          agent: {type: string}
          budget:
            type: object
            required: [max_tokens, total_tokens, remaining, percent_used, is_exhausted]
            properties:
              max_tokens: {type: integer, nullable: true}
              total_tokens: {type: integer, minimum: 0}
              remaining: {type: integer, nullable: true, minimum: 0}
              percent_used: {type: number, minimum: 0}
              is_exhausted: {type: boolean}
  ModelUsage:
    allOf:
      - $ref: '#/components/schemas/UsageTotals'
      - type: object
        required: [model]
        properties:
          model: {type: string}

  Injected:
    type: object
    additionalProperties: false
    required: [thread_id, message_id]
    properties:
      thread_id: {type: string}
      message_id: {type: string}
  AgentState:
    type: object
    additionalProperties: false
    required: [success, agent, state]
    properties:
      success: {type: boolean, enum: [true]}
      agent: {type: string}
      state: {type: string, enum: [running, paused]}
  Killed:
    type: object
    additionalProperties: false
    required: [success, thread_id]
    properties:
      success: {type: boolean, enum: [true]}
      thread_id: {type: string}
  Retried:
    type: object
    additionalProperties: false
    required: [success, message_id]
    properties:
      success: {type: boolean, enum: [true]}
      message_id: {type: string}
  Reloaded:
    type: object
    required: [success, added, removed, updated, changes, error, restart_needed]
    properties:
      success: {type: boolean}
      restart_needed:
        description: "changed settings that take effect only after a restart (api.host, ...)"
        type: array
        items: {type: string}
      added: {$ref: '#/components/schemas/Names'}
      removed: {$ref: '#/components/schemas/Names'}
      updated: {$ref: '#/components/schemas/Names'}
      changes: {type: object, additionalProperties: {$ref: '#/components/schemas/Names'}}
      settings: {$ref: '#/components/schemas/Names'}
      error: {type: string, nullable: true}
  Success:
    type: object
    additionalProperties: false
    required: [success]
    properties:
      success: {type: boolean, enum: [true]}
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


_COMPONENTS["responses"] = {
    # Errors, by the name of their status.
    "BadRequest": _error("the request is not valid: a query parameter, the body, the XML"),
    "Unauthorized": _error("no valid 'Authorization: Bearer <token>' header"),
    "NotFound": _error("no such thing (its id is in details)"),
    "Conflict": _error("the thread is closed"),
    "TooLarge": _error("the body is over the size limit"),
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

_UNAUTHORIZED = {"$ref": "#/components/responses/Unauthorized"}
_UNAVAILABLE = {"$ref": "#/components/responses/Unavailable"}
_UNCOUNTED = ("/events",)  # not counted against organism.api.max_requests


def document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI document of ``routes`` (a fresh dict: callers may change it)."""
    schema = SchemaGenerator(copy.deepcopy(_BASE)).get_schema(routes=list(routes))
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", dict(_UNAUTHORIZED))
            if path not in _UNCOUNTED:
                responses.setdefault("503", dict(_UNAVAILABLE))
            for response in responses.values():
                if "$ref" not in response:
                    response.setdefault("headers", {}).update(copy.deepcopy(_REQUEST_ID))
    return schema

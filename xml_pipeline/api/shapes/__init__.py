"""The shapes of the API's JSON bodies: the ``components.schemas`` of its OpenAPI document.

``xml_pipeline.api.openapi`` builds the document; endpoints refer to these shapes by ``$ref``
in their docstrings. Every enum is a named shape of its own, so that a client generator makes
one type per enum (two inline enums on properties of the same name would make two types of the
same name).

The shapes every resource refers to (the error, the page, times, names and the enums) are here;
those of each resource are in its own module, and ``SCHEMAS`` holds them all, in that order.
"""

from __future__ import annotations

from typing import Any

import yaml

from xml_pipeline.api.shapes import agents, commands, organism, threads, usage

__all__ = ["SCHEMAS"]

_SHARED: dict[str, Any] = yaml.safe_load("""
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

# Every enum is a schema of its own, named once: generated clients get one type for each
# (two inline enums on properties of the same name would make two types of the same name).
OrganismStatus: {type: string, enum: [new, running, stopped]}
ListenerKind: {type: string, enum: [agent, handler]}
AgentStatus:
  type: string
  enum: [running, paused, removed]
  description: removed is a listener a reload took away (its counters are kept)
ThreadStatus: {type: string, enum: [active, completed, failed, killed, paused]}
BudgetScope: {type: string, enum: [thread, thread-agent, agent, organism]}
BudgetWarning:
  type: integer
  enum: [75, 90, 95]
  description: a warning level (percent of the budget used)
""")


def _merged(*groups: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for group in groups:
        twice = sorted(merged.keys() & group.keys())
        if twice:
            raise ValueError(f"The shapes {twice} are defined twice; give each shape one name.")
        merged.update(group)
    return merged


SCHEMAS: dict[str, Any] = _merged(_SHARED, organism.SCHEMAS, agents.SCHEMAS, threads.SCHEMAS,
                                  usage.SCHEMAS, commands.SCHEMAS)

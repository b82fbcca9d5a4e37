"""The listeners: capabilities (what each accepts), agents (how each is doing), their
configuration."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["SCHEMAS"]

SCHEMAS: dict[str, Any] = yaml.safe_load("""
Capability:
  type: object
  required: [name, description, kind, payload_type, payload_namespace, peers]
  properties:
    name: {type: string}
    description: {type: string}
    kind: {$ref: '#/components/schemas/ListenerKind'}
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
    kind: {$ref: '#/components/schemas/ListenerKind'}
    state: {$ref: '#/components/schemas/AgentStatus'}
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
""")

"""The answers of the write endpoints: inject, pause/resume, kill, retry, reload, stop."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["SCHEMAS"]

SCHEMAS: dict[str, Any] = yaml.safe_load("""
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
    state: {$ref: '#/components/schemas/AgentStatus'}
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
    settings:
      description: organism-wide sections that changed (budgets, limits, ...)
      allOf: [{$ref: '#/components/schemas/Names'}]
    error: {type: string, nullable: true}
Success:
  type: object
  additionalProperties: false
  required: [success]
  properties:
    success: {type: boolean, enum: [true]}
""")

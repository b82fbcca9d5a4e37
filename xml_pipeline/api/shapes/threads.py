"""Threads, their messages, and dead letters."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["SCHEMAS"]

SCHEMAS: dict[str, Any] = yaml.safe_load("""
Thread:
  type: object
  required: [thread_id, status, created_at, updated_at, root_message_id, message_count,
             open_messages, dead_letters, rejected, participants, killed_by]
  properties:
    thread_id: {type: string}
    status: {$ref: '#/components/schemas/ThreadStatus'}
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
""")

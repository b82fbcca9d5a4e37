"""The shapes of the API's JSON bodies: the ``components.schemas`` of its OpenAPI document.

``xml_pipeline.api.openapi`` builds the document; endpoints refer to these shapes by ``$ref``
in their docstrings. Every enum is a named shape of its own, so that a client generator makes
one type per enum (two inline enums on properties of the same name would make two types of the
same name).
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["SCHEMAS"]

SCHEMAS: dict[str, Any] = yaml.safe_load("""
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

  Organism:
    type: object
    required: [name, digest, status, path, started_at, loaded_at, position, listeners, reloads,
               reloads_rejected, last_reload_error]
    properties:
      name: {type: string}
      digest: {type: string}
      status: {$ref: '#/components/schemas/OrganismStatus'}
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
               remaining, percent_used, is_exhausted, status, gauges, stopped_by, waiting]
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
        description: the highest warning level crossed, or null
        nullable: true
        allOf: [{$ref: '#/components/schemas/BudgetWarning'}]
      status:
        description: the thread's status, or null for a thread the state no longer keeps
        nullable: true
        allOf: [{$ref: '#/components/schemas/ThreadStatus'}]
      gauges:
        description: every budget the thread's calls count against, in the order checked
        type: array
        items: {$ref: '#/components/schemas/BudgetGauge'}
      stopped_by:
        description: the gauge that holds the thread's waiting call, or null
        allOf: [{$ref: '#/components/schemas/BudgetHold'}]
        nullable: true
      waiting: {type: array, items: {$ref: '#/components/schemas/BudgetHold'}}
  BudgetGauge:
    type: object
    required: [scope, key, agent, limit, used, reserved, remaining, percent_used, is_exhausted,
               holding]
    properties:
      scope: {$ref: '#/components/schemas/BudgetScope'}
      key: {type: string}
      agent: {type: string, nullable: true}
      limit: {type: integer, nullable: true}
      used: {type: integer, minimum: 0}
      reserved: {type: integer, minimum: 0}
      remaining: {type: integer, nullable: true, minimum: 0}
      percent_used: {type: number, minimum: 0}
      is_exhausted: {type: boolean}
      holding: {type: boolean, description: "this gauge holds a waiting call"}
  BudgetHold:
    type: object
    required: [thread_id, scope, key, agent, limit, used, reserved, requested, needed, message]
    properties:
      thread_id: {type: string}
      scope: {$ref: '#/components/schemas/BudgetScope'}
      key: {type: string}
      agent: {type: string, description: the agent whose call waits}
      limit: {type: integer, nullable: true}
      used: {type: integer, minimum: 0}
      reserved: {type: integer, minimum: 0}
      requested: {type: integer, minimum: 0, description: "tokens the waiting call needs"}
      needed: {type: integer, minimum: 0, description: "the smallest limit that frees it"}
      message: {type: string}
  ThreadBudgetSet:
    allOf:
      - $ref: '#/components/schemas/ThreadBudget'
      - type: object
        required: [still_held_by, resumed]
        properties:
          resumed: {type: array, items: {type: string}, description: "[thread_id] if it goes on"}
          still_held_by:
            allOf: [{$ref: '#/components/schemas/BudgetHold'}]
            nullable: true
  BudgetSummary:
    type: object
    required: [max_tokens, total_tokens, remaining, percent_used, is_exhausted]
    properties:
      max_tokens: {type: integer, nullable: true}
      total_tokens: {type: integer, minimum: 0}
      reserved_tokens: {type: integer, minimum: 0}
      remaining: {type: integer, nullable: true, minimum: 0}
      percent_used: {type: number, minimum: 0}
      is_exhausted: {type: boolean}
  BudgetReleased:
    type: object
    required: [resumed, still_held]
    properties:
      resumed: {type: array, items: {type: string}, description: "threads that go on"}
      still_held: {type: array, items: {$ref: '#/components/schemas/BudgetHold'}}
  AgentBudgetSet:
    allOf:
      - $ref: '#/components/schemas/AgentUsage'
      - $ref: '#/components/schemas/BudgetReleased'
  OrganismBudgetSet:
    allOf:
      - $ref: '#/components/schemas/BudgetReleased'
      - type: object
        required: [organism, budget]
        properties:
          organism: {type: string}
          budget: {$ref: '#/components/schemas/BudgetSummary'}
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
          budget: {$ref: '#/components/schemas/BudgetSummary'}
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
""")["schemas"]

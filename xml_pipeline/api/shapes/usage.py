"""Token usage (totals, by agent, by model) and budgets: every gauge a thread counts
against, what holds a waiting call, and the answers of setting a budget."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["SCHEMAS"]

SCHEMAS: dict[str, Any] = yaml.safe_load("""
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
""")

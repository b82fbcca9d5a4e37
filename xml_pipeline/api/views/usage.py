"""Token usage since the last reset (totals, by agent, by model) and the thread budgets."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.api.requests import page, pump_of
from xml_pipeline.api.responses import JSONResponse, listing, timestamp
from xml_pipeline.api.views.agents import find_listener
from xml_pipeline.api.views.budgets import budget_summary, thread_budget
from xml_pipeline.api.views.threads import find_thread
from xml_pipeline.runtime.pump import Pump
from xml_pipeline.state.budget_keys import AgentKey
from xml_pipeline.state.budgets import UsageTotals

__all__ = ["agent_usage", "usage", "usage_agent", "usage_model", "usage_thread",
           "usage_threads", "usage_totals"]


def usage_totals(totals: UsageTotals | None) -> dict[str, Any]:
    t = totals or UsageTotals()
    return {"total_tokens": t.total_tokens, "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens, "request_count": t.request_count,
            "total_cost": round(t.total_cost, 6),
            "avg_latency_ms": round(t.total_latency_ms / t.request_count, 3)
            if t.request_count else 0.0}


async def usage(request: Request) -> Response:
    """Token usage since the last reset: totals, by agent, by model.
    ---
    responses:
      "200": {$ref: "#/components/responses/Usage"}
    """
    budgets = pump_of(request).state.budgets
    threads_state = pump_of(request).state.threads.threads
    active = sum(1 for t in threads_state.values() if t.status == "active")
    return JSONResponse({"usage": {
        "totals": usage_totals(budgets.usage),
        "by_agent": {k: usage_totals(v) for k, v in budgets.usage_by_agent.items()},
        "by_model": {k: usage_totals(v) for k, v in budgets.usage_by_model.items()},
        "active_threads": active,
        "since": timestamp(budgets.usage_since),
    }})


async def usage_threads(request: Request) -> Response:
    """Every thread's token budget, hottest first.
    ---
    parameters:
      - {$ref: "#/components/parameters/limit"}
      - {$ref: "#/components/parameters/offset"}
    responses:
      "200": {$ref: "#/components/responses/ThreadBudgets"}
      "400": {$ref: "#/components/responses/BadRequest"}
    """
    pump = pump_of(request)
    budgets = pump.state.budgets
    limit, offset = page(request)
    ordered = sorted(budgets.threads.items(), key=lambda kv: (-kv[1].used, kv[0]))
    body = listing("threads", [thread_budget(pump, k) for k, _ in ordered[offset:offset + limit]],
                   total=len(ordered), limit=limit, offset=offset)
    body["default_max_tokens"] = budgets.defaults.get("thread_tokens")
    return JSONResponse(body)


async def usage_thread(request: Request) -> Response:
    """One thread's token budget and every gauge its calls count against. The gauges are
    the thread's, each agent's in the thread, each agent's and the organism's; if a budget
    paused the thread, ``stopped_by`` is the one that holds it.
    ---
    parameters: [{$ref: "#/components/parameters/thread_id"}]
    responses:
      "200": {$ref: "#/components/responses/ThreadBudget"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = pump_of(request)
    thread_id = request.path_params["thread_id"]
    find_thread(pump, thread_id)
    return JSONResponse(thread_budget(pump, thread_id))


async def usage_agent(request: Request) -> Response:
    """One agent's usage since the last reset, and its all-time budget.
    ---
    parameters: [{$ref: "#/components/parameters/agent"}]
    responses:
      "200": {$ref: "#/components/responses/AgentUsage"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = pump_of(request)
    name = request.path_params["name"]
    find_listener(pump, name)
    return JSONResponse(agent_usage(pump, name))


def agent_usage(pump: Pump, name: str) -> dict[str, Any]:
    budgets = pump.state.budgets
    return {"agent": name, **usage_totals(budgets.usage_by_agent.get(name)),
            "budget": budget_summary(budgets.gauge(AgentKey(name)))}


async def usage_model(request: Request) -> Response:
    """One model's usage since the last reset.
    ---
    parameters: [{name: model, in: path, required: true, schema: {type: string}}]
    responses:
      "200": {$ref: "#/components/responses/ModelUsage"}
    """
    model = request.path_params["model"]
    totals = pump_of(request).state.budgets.usage_by_model.get(model)
    return JSONResponse({"model": model, **usage_totals(totals)})

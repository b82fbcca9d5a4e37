"""Setting a token budget: a thread's, an agent's in a thread, an agent's, the organism's.

Each is recorded as ``BudgetRaised``; a waiting call it frees goes on at once, and the answer
says which threads a budget still holds (``xml_pipeline.api.views.budgets``)."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.api.requests import caller, parse_json, pump_of
from xml_pipeline.api.responses import ApiError, JSONResponse
from xml_pipeline.api.views import budgets as budget_views
from xml_pipeline.api.views.threads import no_thread
from xml_pipeline.api.views.usage import agent_usage
from xml_pipeline.runtime.pump import Pump
from xml_pipeline.state.budget_keys import ThreadAgentKey

__all__ = ["agent_budget", "organism_budget", "thread_budget"]

_MAX_TOKENS = 10**12


async def _budget_body(request: Request, *, agent: bool) -> tuple[int, str | None]:
    """``(max_tokens, agent)`` of a budget body; raises 415 or 400 saying what is wrong."""
    shape = '{"max_tokens": N} or {"max_tokens": N, "agent": NAME}' if agent \
        else '{"max_tokens": N}'
    if request.headers.get("content-type", "").split(";")[0].strip().lower() \
            != "application/json":
        raise ApiError("unsupported_media_type",
                       f"Send the budget as application/json: {shape}.")
    data = parse_json(await request.body())
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
    pump = pump_of(request)
    thread_id = request.path_params["thread_id"]
    value, agent = await _budget_body(request, agent=True)
    if thread_id not in pump.state.threads.threads:
        raise no_thread(pump, thread_id)
    before = [thread_id] if thread_id in pump.state.budgets.holds else []
    if agent is None:
        await pump.raise_budget("thread", thread_id, value, by=caller(request))
    else:
        _agent(pump, agent)
        budget = ThreadAgentKey(thread_id, agent)
        await pump.raise_budget(budget.scope, budget.key, value, by=caller(request))
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
    pump = pump_of(request)
    name = request.path_params["name"]
    value, _ = await _budget_body(request, agent=False)
    _agent(pump, name)
    before = list(pump.state.budgets.holds)
    await pump.raise_budget("agent", name, value, by=caller(request))
    return JSONResponse({**agent_usage(pump, name),
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
    pump = pump_of(request)
    value, _ = await _budget_body(request, agent=False)
    before = list(pump.state.budgets.holds)
    await pump.raise_budget("organism", pump.organism.name, value, by=caller(request))
    return JSONResponse({"organism": pump.organism.name,
                         "budget": budget_views.budget_summary(pump.state.budgets.organism),
                         **budget_views.still_held(pump, before)})

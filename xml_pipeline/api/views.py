"""Read endpoints: the organism, its listeners, threads, messages, usage and dead letters.

Every answer comes from the pump's projections (or, for message history, from the log);
nothing here changes anything.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from xml_pipeline.api.budgets import budget_summary, thread_budget
from xml_pipeline.api.responses import ApiError, JSONResponse, integer, listing, page
from xml_pipeline.config import Listener
from xml_pipeline.envelope import format_timestamp
from xml_pipeline.events import MessageAccepted
from xml_pipeline.llm import KEY_ENV
from xml_pipeline.pump import Pump
from xml_pipeline.state.budgets import UsageTotals
from xml_pipeline.state.threads import ThreadInfo

__all__ = ["agent_usage", "routes", "usage_totals"]


def _pump(request: Request) -> Pump:
    pump: Pump = request.app.state.pump
    return pump


def _time(seconds: float | None) -> str | None:
    return None if seconds is None else format_timestamp(seconds)


def _listener(pump: Pump, name: str) -> Listener:
    listener = pump.organism.listeners.get(name)
    if listener is None:
        raise ApiError("not_found", f"There is no agent {name!r}; GET /api/v1/agents lists "
                                    "them.", details={"agent": name})
    return listener


# ------------------------------------------------------------------ organism


async def organism(request: Request) -> Response:
    """The running organism.
    ---
    responses:
      "200": {$ref: "#/components/responses/Organism"}
    """
    pump = _pump(request)
    agents = pump.state.agents
    return JSONResponse({
        "name": pump.organism.name, "digest": pump.organism.digest, "status": agents.status,
        "path": str(pump.organism.path), "started_at": _time(agents.started_at),
        "loaded_at": _time(agents.loaded_at), "position": pump.state.position,
        "listeners": len(pump.organism.listeners), "reloads": agents.reloads,
        "reloads_rejected": agents.reloads_rejected,
        "last_reload_error": agents.last_reload_error,
    })


async def organism_config(request: Request) -> Response:
    """The organism.yaml in force.
    ---
    responses:
      "200": {$ref: "#/components/responses/OrganismConfig"}
    """
    pump = _pump(request)
    return JSONResponse({"path": str(pump.organism.path), "digest": pump.organism.digest,
                         "source": pump.organism.source})


async def organism_state(request: Request) -> Response:
    """The fingerprint of the live state, to compare with ``xml-pipeline replay`` (which
    rebuilds it from the log). Waits (up to 10 s) until nothing is in flight.
    ---
    responses:
      "200": {$ref: "#/components/responses/OrganismState"}
    """
    pump = _pump(request)
    idle = True
    try:
        await asyncio.wait_for(pump.wait_idle(), 10.0)
    except TimeoutError:
        idle = False
    return JSONResponse({"position": pump.state.position, "digest": pump.state.digest(),
                         "idle": idle})


# ------------------------------------------------------------------ capabilities and agents


def _capability(listener: Listener, *, full: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": listener.name, "description": listener.description,
        "kind": "agent" if listener.agent else "handler",
        "payload_type": listener.schema.root, "payload_namespace": listener.schema.namespace,
        "peers": list(listener.peers),
    }
    if full:
        data["schema"] = listener.schema.text
        data["example"] = listener.schema.example()
    return data


async def capabilities(request: Request) -> Response:
    """What each listener accepts, for clients and LLM prompts.
    ---
    parameters:
      - {$ref: "#/components/parameters/limit"}
      - {$ref: "#/components/parameters/offset"}
    responses:
      "200": {$ref: "#/components/responses/Capabilities"}
      "400": {$ref: "#/components/responses/BadRequest"}
    """
    pump = _pump(request)
    limit, offset = page(request)
    items = [_capability(item, full=False) for item in pump.organism.listeners.values()]
    return JSONResponse(listing("capabilities", items[offset:offset + limit],
                                total=len(items), limit=limit, offset=offset))


async def capability(request: Request) -> Response:
    """One listener's capability, with its XSD and an example payload.
    ---
    parameters: [{$ref: "#/components/parameters/agent"}]
    responses:
      "200": {$ref: "#/components/responses/Capability"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = _pump(request)
    return JSONResponse(_capability(_listener(pump, request.path_params["name"]), full=True))


def _agent(pump: Pump, listener: Listener) -> dict[str, Any]:
    info = pump.state.agents.agents.get(listener.name)
    mailbox = pump.mailbox(listener.name).statistics()
    return {
        "name": listener.name, "description": listener.description,
        "kind": "agent" if listener.agent else "handler",
        "state": info.status if info else "running",
        "paused_by": info.paused_by if info else None,
        "paused_at": _time(info.paused_at) if info else None,
        "queued": mailbox.queued, "in_flight": mailbox.in_flight,
        "accepted": info.accepted if info else 0, "rejected": info.rejected if info else 0,
        "delivered": info.delivered if info else 0, "succeeded": info.succeeded if info else 0,
        "failed": info.failed if info else 0,
        "dead_lettered": info.dead_lettered if info else 0,
        "last_active_at": _time(info.last_active_at) if info else None,
        "model": listener.agent.model if listener.agent else None,
        "error": (f"{KEY_ENV} is not set; the agent cannot call the model."
                  if listener.agent and not os.environ.get(KEY_ENV) else None),
    }


async def agents(request: Request) -> Response:
    """Every listener with its state (running or paused) and counters.
    ---
    parameters:
      - {$ref: "#/components/parameters/limit"}
      - {$ref: "#/components/parameters/offset"}
    responses:
      "200": {$ref: "#/components/responses/Agents"}
      "400": {$ref: "#/components/responses/BadRequest"}
    """
    pump = _pump(request)
    limit, offset = page(request)
    items = [_agent(pump, item) for item in pump.organism.listeners.values()]
    return JSONResponse(listing("agents", items[offset:offset + limit], total=len(items),
                                limit=limit, offset=offset))


async def agent(request: Request) -> Response:
    """One listener's state and counters.
    ---
    parameters: [{$ref: "#/components/parameters/agent"}]
    responses:
      "200": {$ref: "#/components/responses/Agent"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = _pump(request)
    return JSONResponse(_agent(pump, _listener(pump, request.path_params["name"])))


async def agent_config(request: Request) -> Response:
    """One listener's configuration as loaded from organism.yaml.
    ---
    parameters: [{$ref: "#/components/parameters/agent"}]
    responses:
      "200": {$ref: "#/components/responses/AgentConfig"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = _pump(request)
    return JSONResponse(_listener(pump, request.path_params["name"]).summary())


async def agent_schema(request: Request) -> Response:
    """One listener's payload XSD, as text.
    ---
    parameters: [{$ref: "#/components/parameters/agent"}]
    responses:
      "200":
        description: "the XSD"
        content: {application/xml: {schema: {type: string}}}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = _pump(request)
    listener = _listener(pump, request.path_params["name"])
    return Response(listener.schema.text, media_type="application/xml")


# ------------------------------------------------------------------ threads and messages

_STATUSES = ("active", "completed", "failed", "killed", "paused")


def _thread(thread: ThreadInfo) -> dict[str, Any]:
    return {
        "thread_id": thread.thread_id, "status": thread.status,
        "created_at": _time(thread.created_at), "updated_at": _time(thread.updated_at),
        "root_message_id": thread.root_message_id, "message_count": thread.message_count,
        "open_messages": thread.open_count, "dead_letters": thread.dead_count,
        "rejected": thread.rejected_count, "participants": list(thread.participants),
        "killed_by": thread.killed_by,
    }


async def threads(request: Request) -> Response:
    """Threads, most recently active first.
    ---
    parameters:
      - {name: status, in: query, schema: {$ref: "#/components/schemas/ThreadStatus"}}
      - {name: agent, in: query, description: "only threads this listener took part in",
         schema: {type: string}}
      - {$ref: "#/components/parameters/limit"}
      - {$ref: "#/components/parameters/offset"}
    responses:
      "200": {$ref: "#/components/responses/Threads"}
      "400": {$ref: "#/components/responses/BadRequest"}
    """
    pump = _pump(request)
    limit, offset = page(request)
    status = request.query_params.get("status")
    if status is not None and status not in _STATUSES:
        raise ApiError("invalid_request", f"The query parameter 'status' must be one of "
                                          f"{', '.join(_STATUSES)}, not {status!r}.",
                       details={"parameter": "status"})
    agent_name = request.query_params.get("agent")
    found = [t for t in pump.state.threads.threads.values()
             if (status is None or t.status == status)
             and (agent_name is None or agent_name in t.participants)]
    found.sort(key=lambda t: (t.updated_at, t.thread_id), reverse=True)
    return JSONResponse(listing("threads", [_thread(t) for t in found[offset:offset + limit]],
                                total=len(found), limit=limit, offset=offset))


def no_thread(pump: Pump, thread_id: str) -> ApiError:
    """The 404 for a thread the state does not hold (perhaps ended long ago)."""
    threads = pump.state.threads
    message = f"There is no thread {thread_id!r}."
    if threads.forgotten:
        message = (f"There is no thread {thread_id!r} among the active threads and the newest "
                   f"{threads.keep_ended} ended ones (organism.retention.ended_threads); the "
                   f"log keeps every event of older threads: GET /api/v1/events?thread=ID.")
    return ApiError("not_found", message, details={"thread_id": thread_id})


def _find_thread(pump: Pump, thread_id: str) -> ThreadInfo:
    thread = pump.state.threads.threads.get(thread_id)
    if thread is None:
        raise no_thread(pump, thread_id)
    return thread


async def thread(request: Request) -> Response:
    """One thread.
    ---
    parameters: [{$ref: "#/components/parameters/thread_id"}]
    responses:
      "200": {$ref: "#/components/responses/Thread"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = _pump(request)
    return JSONResponse(_thread(_find_thread(pump, request.path_params["thread_id"])))


def _message(pump: Pump, position: int, event: MessageAccepted) -> dict[str, Any]:
    info = pump.state.threads.messages.get(event.message_id)
    dead = pump.state.threads.dead_letters.get(event.message_id)
    status = info.status if info else ("dead" if dead else "finished")
    return {
        "message_id": event.message_id, "thread_id": event.thread_id,
        "parent_id": event.parent_id, "sender": event.sender, "to": event.to,
        "payload_type": event.payload_type, "accepted_at": _time(event.at),
        "position": position, "status": status, "envelope": event.envelope,
    }


async def thread_messages(request: Request) -> Response:
    """The messages of one thread in the order they were accepted, with their envelopes and
    causal links (``parent_id``).
    ---
    parameters:
      - {$ref: "#/components/parameters/thread_id"}
      - {$ref: "#/components/parameters/limit"}
      - {$ref: "#/components/parameters/offset"}
    responses:
      "200": {$ref: "#/components/responses/Messages"}
      "400": {$ref: "#/components/responses/BadRequest"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = _pump(request)
    found = _find_thread(pump, request.path_params["thread_id"])
    limit, offset = page(request)
    wanted = found.positions[offset:offset + limit]
    items: list[dict[str, Any]] = []
    if wanted:
        remaining = set(wanted)
        async for record in pump.log.read(after=wanted[0] - 1):
            if record.position in remaining and isinstance(record.event, MessageAccepted):
                items.append(_message(pump, record.position, record.event))
                remaining.discard(record.position)
            if not remaining or record.position >= wanted[-1]:
                break
    return JSONResponse(listing("messages", items, total=len(found.positions), limit=limit,
                                offset=offset))


async def messages(request: Request) -> Response:
    """Accepted messages in log order, after a position (for paging through history).
    ---
    parameters:
      - {name: after, in: query, description: "a log position",
         schema: {type: integer, minimum: 0, maximum: 4611686018427387904, default: 0}}
      - {name: agent, in: query, description: "only messages from or to this listener",
         schema: {type: string}}
      - {$ref: "#/components/parameters/limit"}
      - {$ref: "#/components/parameters/offset"}
    responses:
      "200": {$ref: "#/components/responses/Messages"}
      "400": {$ref: "#/components/responses/BadRequest"}
    """
    pump = _pump(request)
    limit, offset = page(request)
    after = integer(request, "after", 0)
    agent_name = request.query_params.get("agent")
    items: list[dict[str, Any]] = []
    # Without a filter the state knows the total; with one, the matching messages are counted
    # to the end of the log (the scan goes on, without building items, past the page).
    filtered = agent_name is not None or after > 0
    matched = 0
    async for record in pump.log.read(after=after):
        event = record.event
        if not isinstance(event, MessageAccepted):
            continue
        if agent_name is not None and agent_name not in (event.sender, event.to):
            continue
        matched += 1
        if offset < matched <= offset + limit:
            items.append(_message(pump, record.position, event))
        if matched >= offset + limit and not filtered:
            break
    total = matched if filtered else pump.state.threads.accepted
    return JSONResponse(listing("messages", items, total=total, limit=limit, offset=offset))


async def dead_letters(request: Request) -> Response:
    """Messages whose handler failed for good; retry one with POST .../retry.
    ---
    parameters:
      - {$ref: "#/components/parameters/limit"}
      - {$ref: "#/components/parameters/offset"}
    responses:
      "200": {$ref: "#/components/responses/DeadLetters"}
      "400": {$ref: "#/components/responses/BadRequest"}
    """
    pump = _pump(request)
    limit, offset = page(request)
    state = pump.state.threads
    items = []
    for message_id, reason in state.dead_letters.items():
        info = state.messages.get(message_id)
        items.append({"message_id": message_id, "reason": reason,
                      "thread_id": info.thread_id if info else None,
                      "listener": info.to if info else None,
                      "sender": info.sender if info else None,
                      "attempts": info.attempts if info else 0,
                      "accepted_at": _time(info.accepted_at) if info else None})
    return JSONResponse(listing("dead_letters", items[offset:offset + limit],
                                total=len(items), limit=limit, offset=offset))


# ------------------------------------------------------------------ usage


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
    budgets = _pump(request).state.budgets
    threads_state = _pump(request).state.threads.threads
    active = sum(1 for t in threads_state.values() if t.status == "active")
    return JSONResponse({"usage": {
        "totals": usage_totals(budgets.usage),
        "by_agent": {k: usage_totals(v) for k, v in budgets.usage_by_agent.items()},
        "by_model": {k: usage_totals(v) for k, v in budgets.usage_by_model.items()},
        "active_threads": active,
        "since": _time(budgets.usage_since),
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
    pump = _pump(request)
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
    pump = _pump(request)
    thread_id = request.path_params["thread_id"]
    _find_thread(pump, thread_id)
    return JSONResponse(thread_budget(pump, thread_id))


async def usage_agent(request: Request) -> Response:
    """One agent's usage since the last reset, and its all-time budget.
    ---
    parameters: [{$ref: "#/components/parameters/agent"}]
    responses:
      "200": {$ref: "#/components/responses/AgentUsage"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = _pump(request)
    name = request.path_params["name"]
    _listener(pump, name)
    return JSONResponse(agent_usage(pump, name))


def agent_usage(pump: Pump, name: str) -> dict[str, Any]:
    budgets = pump.state.budgets
    return {"agent": name, **usage_totals(budgets.usage_by_agent.get(name)),
            "budget": budget_summary(budgets.agent_gauge_or_new(name))}


async def usage_model(request: Request) -> Response:
    """One model's usage since the last reset.
    ---
    parameters: [{name: model, in: path, required: true, schema: {type: string}}]
    responses:
      "200": {$ref: "#/components/responses/ModelUsage"}
    """
    model = request.path_params["model"]
    totals = _pump(request).state.budgets.usage_by_model.get(model)
    return JSONResponse({"model": model, **usage_totals(totals)})


routes = [
    Route("/organism", organism, methods=["GET"]),
    Route("/organism/config", organism_config, methods=["GET"]),
    Route("/organism/state", organism_state, methods=["GET"]),
    Route("/capabilities", capabilities, methods=["GET"]),
    Route("/capabilities/{name}", capability, methods=["GET"]),
    Route("/agents", agents, methods=["GET"]),
    Route("/agents/{name}", agent, methods=["GET"]),
    Route("/agents/{name}/config", agent_config, methods=["GET"]),
    Route("/agents/{name}/schema", agent_schema, methods=["GET"]),
    Route("/threads", threads, methods=["GET"]),
    Route("/threads/{thread_id}", thread, methods=["GET"]),
    Route("/threads/{thread_id}/messages", thread_messages, methods=["GET"]),
    Route("/messages", messages, methods=["GET"]),
    Route("/dead-letters", dead_letters, methods=["GET"]),
    Route("/usage", usage, methods=["GET"]),
    Route("/usage/threads", usage_threads, methods=["GET"]),
    Route("/usage/threads/{thread_id}", usage_thread, methods=["GET"]),
    Route("/usage/agents/{name}", usage_agent, methods=["GET"]),
    Route("/usage/models/{model}", usage_model, methods=["GET"]),
]

"""The listeners: what each accepts (its capability) and how each is doing (its agent view)."""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.api.requests import page, pump_of
from xml_pipeline.api.responses import ApiError, JSONResponse, listing, timestamp
from xml_pipeline.config import Listener
from xml_pipeline.runtime.llm import KEY_ENV
from xml_pipeline.runtime.pump import Pump
from xml_pipeline.runtime.statistics import PumpStatistics

__all__ = ["agent", "agent_config", "agent_schema", "agents", "capabilities", "capability",
           "find_listener"]


def find_listener(pump: Pump, name: str) -> Listener:
    listener = pump.organism.listeners.get(name)
    if listener is None:
        raise ApiError("not_found", f"There is no agent {name!r}; GET /api/v1/agents lists "
                                    "them.", details={"agent": name})
    return listener


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
    pump = pump_of(request)
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
    pump = pump_of(request)
    return JSONResponse(_capability(find_listener(pump, request.path_params["name"]), full=True))


def _agent(pump: Pump, listener: Listener, stats: PumpStatistics) -> dict[str, Any]:
    info = pump.state.agents.agents.get(listener.name)
    mailbox = next(entry for entry in stats.listeners if entry.name == listener.name)
    return {
        "name": listener.name, "description": listener.description,
        "kind": "agent" if listener.agent else "handler",
        "state": info.status if info else "running",
        "paused_by": info.paused_by if info else None,
        "paused_at": timestamp(info.paused_at) if info else None,
        "queued": mailbox.queued, "in_flight": mailbox.in_flight,
        "accepted": info.accepted if info else 0, "rejected": info.rejected if info else 0,
        "delivered": info.delivered if info else 0, "succeeded": info.succeeded if info else 0,
        "failed": info.failed if info else 0,
        "dead_lettered": info.dead_lettered if info else 0,
        "last_active_at": timestamp(info.last_active_at) if info else None,
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
    pump = pump_of(request)
    limit, offset = page(request)
    stats = pump.statistics()
    items = [_agent(pump, item, stats) for item in pump.organism.listeners.values()]
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
    pump = pump_of(request)
    listener = find_listener(pump, request.path_params["name"])
    return JSONResponse(_agent(pump, listener, pump.statistics()))


async def agent_config(request: Request) -> Response:
    """One listener's configuration as loaded from organism.yaml.
    ---
    parameters: [{$ref: "#/components/parameters/agent"}]
    responses:
      "200": {$ref: "#/components/responses/AgentConfig"}
      "404": {$ref: "#/components/responses/NotFound"}
    """
    pump = pump_of(request)
    return JSONResponse(find_listener(pump, request.path_params["name"]).summary())


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
    pump = pump_of(request)
    listener = find_listener(pump, request.path_params["name"])
    return Response(listener.schema.text, media_type="application/xml")

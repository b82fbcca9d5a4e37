"""The organism: what runs, the organism.yaml in force, and the fingerprint of its state."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.api.requests import pump_of
from xml_pipeline.api.responses import JSONResponse, timestamp

__all__ = ["organism", "organism_config", "organism_state"]


async def organism(request: Request) -> Response:
    """The running organism.
    ---
    responses:
      "200": {$ref: "#/components/responses/Organism"}
    """
    pump = pump_of(request)
    agents = pump.state.agents
    return JSONResponse({
        "name": pump.organism.name, "digest": pump.organism.digest, "status": agents.status,
        "path": str(pump.organism.path), "started_at": timestamp(agents.started_at),
        "loaded_at": timestamp(agents.loaded_at), "position": pump.state.position,
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
    pump = pump_of(request)
    return JSONResponse({"path": str(pump.organism.path), "digest": pump.organism.digest,
                         "source": pump.organism.source})


async def organism_state(request: Request) -> Response:
    """The fingerprint of the live state, to compare with ``xml-pipeline replay`` (which
    rebuilds it from the log). Waits (up to 10 s) until nothing is in flight.
    ---
    responses:
      "200": {$ref: "#/components/responses/OrganismState"}
    """
    pump = pump_of(request)
    idle = True
    try:
        await asyncio.wait_for(pump.wait_idle(), 10.0)
    except TimeoutError:
        idle = False
    return JSONResponse({"position": pump.state.position, "digest": pump.state.digest(),
                         "idle": idle})

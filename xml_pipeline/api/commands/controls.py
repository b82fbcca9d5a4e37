"""The operator's controls: pause and resume an agent, kill a thread, reload or stop the
organism, reset the usage totals, retry a dead letter. Each is recorded in the log before it
takes effect."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.api.requests import caller, pump_of
from xml_pipeline.api.responses import ApiError, JSONResponse
from xml_pipeline.api.views.threads import no_thread
from xml_pipeline.runtime.reload import reload_organism

__all__ = ["kill", "pause", "reload", "resume", "retry", "stop", "usage_reset"]


async def pause(request: Request) -> Response:
    """Pause an agent: it receives nothing until resumed; its messages wait in order.
    ---
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {$ref: "#/components/parameters/client_name"}
    responses:
      "200": {$ref: "#/components/responses/AgentState"}
      "404": {$ref: "#/components/responses/NotFound"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    name = request.path_params["name"]
    state = await pump_of(request).pause(name, by=caller(request))
    return JSONResponse({"success": True, "agent": name, "state": state})


async def resume(request: Request) -> Response:
    """Resume a paused agent; its waiting messages are delivered in order.
    ---
    parameters:
      - {$ref: "#/components/parameters/agent"}
      - {$ref: "#/components/parameters/client_name"}
    responses:
      "200": {$ref: "#/components/responses/AgentState"}
      "404": {$ref: "#/components/responses/NotFound"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    name = request.path_params["name"]
    state = await pump_of(request).resume(name, by=caller(request))
    return JSONResponse({"success": True, "agent": name, "state": state})


async def kill(request: Request) -> Response:
    """Kill a thread: drop its queued messages, cancel its handlers, accept nothing more.
    ---
    parameters:
      - {$ref: "#/components/parameters/thread_id"}
      - {$ref: "#/components/parameters/client_name"}
    responses:
      "200": {$ref: "#/components/responses/Killed"}
      "404": {$ref: "#/components/responses/NotFound"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    thread_id = request.path_params["thread_id"]
    pump = pump_of(request)
    if not await pump.kill_thread(thread_id, by=caller(request)):
        raise no_thread(pump, thread_id)
    return JSONResponse({"success": True, "thread_id": thread_id})


async def reload(request: Request) -> Response:
    """Reload organism.yaml: validate fully, then swap; a bad file changes nothing.
    ---
    responses:
      "200": {$ref: "#/components/responses/Reloaded"}
      "422":
        description: "the new organism is not valid; the old one still runs"
        content: {application/json: {schema: {$ref: "#/components/schemas/Reloaded"}}}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    result = await reload_organism(pump_of(request))
    body = {"success": result.success, "added": list(result.added),
            "removed": list(result.removed), "updated": list(result.updated),
            "changes": result.changes, "error": result.error,
            "restart_needed": list(result.restart_needed), "settings": list(result.settings)}
    return JSONResponse(body, status_code=200 if result.success else 422)


async def stop(request: Request) -> Response:
    """Stop the organism gracefully (in-flight handlers finish, then the server exits).
    ---
    responses:
      "202": {$ref: "#/components/responses/Success"}
    """
    request.app.state.stop.set()
    return JSONResponse({"success": True}, status_code=202)


async def usage_reset(request: Request) -> Response:
    """Restart the usage totals (recorded as UsageReset; budgets and history are kept).
    ---
    parameters: [{$ref: "#/components/parameters/client_name"}]
    responses:
      "200": {$ref: "#/components/responses/Success"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    await pump_of(request).reset_usage(by=caller(request))
    return JSONResponse({"success": True})


async def retry(request: Request) -> Response:
    """Deliver a dead-lettered message again.
    ---
    parameters:
      - {name: message_id, in: path, required: true, schema: {type: string}}
      - {$ref: "#/components/parameters/client_name"}
    responses:
      "200": {$ref: "#/components/responses/Retried"}
      "404": {$ref: "#/components/responses/NotFound"}
      "409": {$ref: "#/components/responses/Conflict"}
      "503": {$ref: "#/components/responses/Unavailable"}
    """
    message_id = request.path_params["message_id"]
    if not await pump_of(request).retry_dead_letter(message_id, by=caller(request)):
        raise ApiError("not_found", f"{message_id!r} is not a dead letter; GET "
                                    "/api/v1/dead-letters lists them.",
                       details={"message_id": message_id})
    return JSONResponse({"success": True, "message_id": message_id})

"""Threads: the list (by status and participant), one thread, and the 404 for a thread the
state does not hold."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.api.requests import page, pump_of
from xml_pipeline.api.responses import ApiError, JSONResponse, listing, timestamp
from xml_pipeline.runtime.pump import Pump
from xml_pipeline.state.threads import ThreadInfo

__all__ = ["find_thread", "no_thread", "thread", "threads"]


_STATUSES = ("active", "completed", "failed", "killed", "paused")


def _thread(thread: ThreadInfo) -> dict[str, Any]:
    return {
        "thread_id": thread.thread_id, "status": thread.status,
        "created_at": timestamp(thread.created_at), "updated_at": timestamp(thread.updated_at),
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
    pump = pump_of(request)
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


def find_thread(pump: Pump, thread_id: str) -> ThreadInfo:
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
    pump = pump_of(request)
    return JSONResponse(_thread(find_thread(pump, request.path_params["thread_id"])))

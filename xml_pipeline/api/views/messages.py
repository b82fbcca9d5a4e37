"""Messages: a thread's, all of them in log order, and the dead letters.

Message history comes from the log (the state keeps only open messages and counters); a page
reads the log from its first position on."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.api.requests import integer, page, pump_of
from xml_pipeline.api.responses import JSONResponse, listing, timestamp
from xml_pipeline.api.views.threads import find_thread
from xml_pipeline.events import MessageAccepted
from xml_pipeline.runtime.pump import Pump

__all__ = ["dead_letters", "messages", "thread_messages"]


def _message(pump: Pump, position: int, event: MessageAccepted) -> dict[str, Any]:
    info = pump.state.threads.messages.get(event.message_id)
    dead = pump.state.threads.dead_letters.get(event.message_id)
    status = info.status if info else ("dead" if dead else "finished")
    return {
        "message_id": event.message_id, "thread_id": event.thread_id,
        "parent_id": event.parent_id, "sender": event.sender, "to": event.to,
        "payload_type": event.payload_type, "accepted_at": timestamp(event.at),
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
    pump = pump_of(request)
    found = find_thread(pump, request.path_params["thread_id"])
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
    pump = pump_of(request)
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
    pump = pump_of(request)
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
                      "accepted_at": timestamp(info.accepted_at) if info else None})
    return JSONResponse(listing("dead_letters", items[offset:offset + limit],
                                total=len(items), limit=limit, offset=offset))

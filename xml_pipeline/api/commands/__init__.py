"""Write endpoints: inject, pause/resume, kill, reload, stop, usage reset, dead-letter retry,
and setting a budget (a thread's, an agent's in a thread, an agent's, the organism's).

Each acts on the running pump, and each is recorded in the log before it takes effect.
``POST /inject`` answers 202 only once the message is durable; every input it refuses is
recorded as ``MessageRejected``. ``routes`` is the table of them all.
"""

from __future__ import annotations

from starlette.routing import Route

from xml_pipeline.api.commands import budgets, controls, inject

__all__ = ["routes"]

routes = [
    Route("/inject", inject.inject, methods=["POST"]),
    Route("/agents/{name}/pause", controls.pause, methods=["POST"]),
    Route("/agents/{name}/resume", controls.resume, methods=["POST"]),
    Route("/threads/{thread_id}/kill", controls.kill, methods=["POST"]),
    Route("/organism/reload", controls.reload, methods=["POST"]),
    Route("/organism/stop", controls.stop, methods=["POST"]),
    Route("/usage/reset", controls.usage_reset, methods=["POST"]),
    Route("/usage/threads/{thread_id}/budget", budgets.thread_budget, methods=["POST"]),
    Route("/usage/agents/{name}/budget", budgets.agent_budget, methods=["POST"]),
    Route("/usage/organism/budget", budgets.organism_budget, methods=["POST"]),
    Route("/dead-letters/{message_id}/retry", controls.retry, methods=["POST"]),
]

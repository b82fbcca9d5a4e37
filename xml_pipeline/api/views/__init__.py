"""Read endpoints, by resource: the organism, its listeners, threads, messages, usage and dead
letters.

Every answer comes from the pump's projections (or, for message history, from the log);
nothing here changes anything. ``routes`` is the table of them all.
"""

from __future__ import annotations

from starlette.routing import Route

from xml_pipeline.api.views import agents, messages, organism, threads, usage

__all__ = ["routes"]

routes = [
    Route("/organism", organism.organism, methods=["GET"]),
    Route("/organism/config", organism.organism_config, methods=["GET"]),
    Route("/organism/state", organism.organism_state, methods=["GET"]),
    Route("/capabilities", agents.capabilities, methods=["GET"]),
    Route("/capabilities/{name}", agents.capability, methods=["GET"]),
    Route("/agents", agents.agents, methods=["GET"]),
    Route("/agents/{name}", agents.agent, methods=["GET"]),
    Route("/agents/{name}/config", agents.agent_config, methods=["GET"]),
    Route("/agents/{name}/schema", agents.agent_schema, methods=["GET"]),
    Route("/threads", threads.threads, methods=["GET"]),
    Route("/threads/{thread_id}", threads.thread, methods=["GET"]),
    Route("/threads/{thread_id}/messages", messages.thread_messages, methods=["GET"]),
    Route("/messages", messages.messages, methods=["GET"]),
    Route("/dead-letters", messages.dead_letters, methods=["GET"]),
    Route("/usage", usage.usage, methods=["GET"]),
    Route("/usage/threads", usage.usage_threads, methods=["GET"]),
    Route("/usage/threads/{thread_id}", usage.usage_thread, methods=["GET"]),
    Route("/usage/agents/{name}", usage.usage_agent, methods=["GET"]),
    Route("/usage/models/{model}", usage.usage_model, methods=["GET"]),
]

"""The budget views: every gauge a thread counts against, and what holds a paused thread.

A thread's budget view keeps the AgentServer fields of its own gauge (``max_tokens``,
``total_tokens``, ...) and adds ``gauges`` (the thread's, each agent's in the thread, each
agent's, the organism's, in the order a call checks them) and ``stopped_by``: the gauge that
holds its waiting call now, with the tokens that call needs and a sentence saying how to
raise it. ``read`` endpoints (views) and the raises (commands) answer with these shapes.
"""

from __future__ import annotations

from typing import Any

from xml_pipeline.runtime.pump import Pump
from xml_pipeline.state.budget_keys import (
    AgentKey,
    BudgetKey,
    OrganismKey,
    ThreadAgentKey,
    ThreadKey,
)
from xml_pipeline.state.budgets import Blocker, Gauge, waiting

__all__ = ["budget_summary", "held", "still_held", "thread_budget"]

_ROUTES = {
    "thread": "/api/v1/usage/threads/{thread}/budget",
    "thread-agent": "/api/v1/usage/threads/{thread}/budget",
    "agent": "/api/v1/usage/agents/{agent}/budget",
    "organism": "/api/v1/usage/organism/budget",
}


def _gauge(budget: BudgetKey, gauge: Gauge, *, holding: bool) -> dict[str, Any]:
    agent = budget.agent if isinstance(budget, ThreadAgentKey | AgentKey) else None
    return {"scope": budget.scope, "key": budget.key, "agent": agent, "limit": gauge.limit,
            "used": gauge.used, "reserved": gauge.reserved, "remaining": gauge.remaining,
            "percent_used": gauge.percent_used, "is_exhausted": gauge.exhausted,
            "holding": holding}


def _subject(blocker: Blocker) -> tuple[str, str]:
    """Whose budget holds the call, and how to name the call after it."""
    agent = blocker.agent
    if blocker.scope == "thread-agent":
        return f"{agent}'s budget in this thread", "its next call"
    if blocker.scope == "agent":
        return f"agent {agent}'s budget", "its next call"
    if blocker.scope == "organism":
        return "the organism's budget", f"{agent}'s next call"
    return "the thread's budget", f"{agent}'s next call"


def held(thread_id: str, blocker: Blocker) -> dict[str, Any]:
    """A waiting call and the gauge that holds it, with a sentence saying what to raise."""
    gauge = blocker.gauge
    subject, call = _subject(blocker)
    body = f'{{"max_tokens": {blocker.needed}, "agent": "{blocker.agent}"}}' \
        if blocker.scope == "thread-agent" else f'{{"max_tokens": {blocker.needed}}}'
    route = _ROUTES[blocker.scope].format(thread=thread_id, agent=blocker.agent)
    message = (f"Thread {thread_id} is still paused: {subject} allows {gauge.limit} tokens "
               f"({gauge.used} used, {gauge.reserved} reserved) and {call} needs up to "
               f"{blocker.requested}. Raise it with POST {route} {body} or more.")
    return {"thread_id": thread_id, "scope": blocker.scope, "key": blocker.key,
            "agent": blocker.agent, "limit": gauge.limit, "used": gauge.used,
            "reserved": gauge.reserved, "requested": blocker.requested,
            "needed": blocker.needed, "message": message}


def _agents_in(pump: Pump, thread_id: str) -> list[str]:
    """The LLM agents with a gauge in the thread: those that took part or wait in it."""
    budgets = pump.state.budgets
    info = pump.state.threads.threads.get(thread_id)
    taking_part = set(info.participants) if info is not None else set()
    holds = budgets.holds.get(thread_id, {})
    names = [name for name, listener in pump.organism.listeners.items()
             if listener.agent is not None and (
                 name in taking_part or name in holds
                 or ThreadAgentKey(thread_id, name).key in budgets.thread_agents)]
    return names + [name for name in holds if name not in names]


def thread_budget(pump: Pump, thread_id: str) -> dict[str, Any]:
    """The budget view of ``thread_id`` (which the caller knows exists)."""
    budgets = pump.state.budgets
    organism = pump.organism.name
    own = ThreadKey(thread_id)
    gauge = budgets.gauge(own)
    blockers = waiting(budgets, thread_id, organism=organism)
    holding = {b.budget for b in blockers}
    agents = _agents_in(pump, thread_id)
    listed: list[BudgetKey] = [own, *(ThreadAgentKey(thread_id, name) for name in agents),
                               *(AgentKey(name) for name in agents), OrganismKey(organism)]
    info = pump.state.threads.threads.get(thread_id)
    stops = [held(thread_id, blocker) for blocker in blockers]
    return {"thread_id": thread_id, "max_tokens": gauge.limit,
            "prompt_tokens": gauge.prompt_tokens, "completion_tokens": gauge.completion_tokens,
            "total_tokens": gauge.used, "reserved_tokens": gauge.reserved,
            "remaining": gauge.remaining, "percent_used": gauge.percent_used,
            "is_exhausted": bool(blockers),
            "warning": budgets.warnings.get(str(own)),
            "status": info.status if info is not None else None,
            "gauges": [_gauge(budget, budgets.gauge(budget), holding=budget in holding)
                       for budget in listed],
            "stopped_by": stops[0] if stops else None,
            "waiting": stops}


def budget_summary(gauge: Gauge) -> dict[str, Any]:
    """An agent's or the organism's gauge, in the AgentServer's words."""
    return {"max_tokens": gauge.limit, "total_tokens": gauge.used,
            "reserved_tokens": gauge.reserved, "remaining": gauge.remaining,
            "percent_used": gauge.percent_used, "is_exhausted": gauge.exhausted}


def still_held(pump: Pump, before: list[str], *, thread_id: str | None = None
               ) -> dict[str, Any]:
    """After a raise: which of the threads ``before`` (those a budget held) go on, and the
    waiting calls a budget still holds (of ``thread_id`` only, if given)."""
    budgets = pump.state.budgets
    organism = pump.organism.name
    threads = list(budgets.holds) if thread_id is None else \
        [thread_id] if thread_id in budgets.holds else []
    return {"resumed": [t for t in before if t not in budgets.holds],
            "still_held": [held(t, blocker) for t in threads
                           for blocker in waiting(budgets, t, organism=organism)]}

"""The organism and its listeners ("agents"): a pure fold over the log.

The organism in force at any position is the last ``OrganismLoaded``/``OrganismReloaded``
before it; each listener's status (``running``, ``paused``, ``removed``) and counters follow
from delivery events and ``AgentPaused``/``AgentResumed``. A removed listener is not paused:
one added back by a later reload runs, with no ``paused_by``/``paused_at``.

``started_at`` is the last ``OrganismStarted``; ``loaded_at`` is when the organism in force
was put in force by this process: at its start (``OrganismStarted``: the process loaded and
checked the files) or at a later reload, so ``loaded_at >= started_at`` always holds.
``last_reload_error`` is the error of the last reload if it was rejected; a reload that
succeeds (``OrganismReloaded``, recorded also when the files are merely good again) or a start
(which loads and checks the same files) clears it. ``reloads_rejected`` counts every rejected
reload in the log.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Any

import msgspec

from xml_pipeline.events import (
    AgentPaused,
    AgentResumed,
    Event,
    HandlerFailed,
    HandlerSucceeded,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    MessageRejected,
    OrganismLoaded,
    OrganismReloaded,
    OrganismStarted,
    OrganismStopped,
    ReloadRejected,
)

__all__ = ["AgentInfo", "Agents", "evolve", "pause", "resume"]


class AgentInfo(msgspec.Struct, kw_only=True):
    name: str
    config: dict[str, Any]
    status: str = "running"  # running | paused | removed
    paused_by: str | None = None
    paused_at: float | None = None
    accepted: int = 0  # messages accepted for this listener
    rejected: int = 0  # messages refused on their way to it
    delivered: int = 0
    succeeded: int = 0
    failed: int = 0
    dead_lettered: int = 0
    last_active_at: float | None = None


class Agents(msgspec.Struct, kw_only=True):
    name: str = ""
    digest: str = ""
    status: str = "new"  # new | running | stopped
    started_at: float | None = None
    loaded_at: float | None = None
    starts: int = 0
    reloads: int = 0
    reloads_rejected: int = 0
    last_reload_error: str | None = None
    budgets: dict[str, int | None] = msgspec.field(default_factory=dict)
    agents: dict[str, AgentInfo] = msgspec.field(default_factory=dict)


@singledispatch
def evolve(event: Event, state: Agents, position: int) -> Agents:
    return state


@evolve.register
def _(event: OrganismStarted, state: Agents, position: int) -> Agents:
    state.status = "running"
    state.started_at = state.loaded_at = event.at
    state.last_reload_error = None
    state.starts += 1
    return state


def _load(state: Agents, at: float, name: str, digest: str, budgets: dict[str, int | None],
          listeners: dict[str, dict[str, Any]]) -> None:
    state.name, state.digest, state.loaded_at = name, digest, at
    state.budgets = dict(budgets)
    for agent_name, info in state.agents.items():
        if agent_name not in listeners:
            info.status = "removed"
            info.paused_by = info.paused_at = None
    for agent_name, config in listeners.items():
        known = state.agents.get(agent_name)
        if known is None:
            state.agents[agent_name] = AgentInfo(name=agent_name, config=dict(config))
        else:
            known.config = dict(config)
            if known.status == "removed":
                known.status = "running"


@evolve.register
def _(event: OrganismLoaded, state: Agents, position: int) -> Agents:
    _load(state, event.at, event.name, event.digest, event.budgets, event.listeners)
    return state


@evolve.register
def _(event: OrganismReloaded, state: Agents, position: int) -> Agents:
    _load(state, event.at, event.name, event.digest, event.budgets, event.listeners)
    state.reloads += 1
    state.last_reload_error = None
    return state


@evolve.register
def _(event: ReloadRejected, state: Agents, position: int) -> Agents:
    state.reloads_rejected += 1
    state.last_reload_error = event.error
    return state


@evolve.register
def _(event: OrganismStopped, state: Agents, position: int) -> Agents:
    state.status = "stopped"
    return state


@evolve.register
def _(event: AgentPaused, state: Agents, position: int) -> Agents:
    info = state.agents.get(event.agent)
    if info is not None and info.status == "running":
        info.status = "paused"
        info.paused_by = event.by
        info.paused_at = event.at
    return state


@evolve.register
def _(event: AgentResumed, state: Agents, position: int) -> Agents:
    info = state.agents.get(event.agent)
    if info is not None and info.status == "paused":
        info.status = "running"
        info.paused_by = None
        info.paused_at = None
    return state


@evolve.register
def _(event: MessageAccepted, state: Agents, position: int) -> Agents:
    info = state.agents.get(event.to)
    if info is not None:
        info.accepted += 1
    return state


@evolve.register
def _(event: MessageRejected, state: Agents, position: int) -> Agents:
    info = state.agents.get(event.to) if event.to is not None else None
    if info is not None:
        info.rejected += 1
    return state


@evolve.register
def _(event: MessageDelivered, state: Agents, position: int) -> Agents:
    info = state.agents.get(event.listener)
    if info is not None:
        info.delivered += 1
        info.last_active_at = event.at
    return state


@evolve.register
def _(event: HandlerSucceeded, state: Agents, position: int) -> Agents:
    info = state.agents.get(event.listener)
    if info is not None:
        info.succeeded += 1
        info.last_active_at = event.at
    return state


@evolve.register
def _(event: HandlerFailed, state: Agents, position: int) -> Agents:
    info = state.agents.get(event.listener)
    if info is not None:
        info.failed += 1
        info.last_active_at = event.at
    return state


@evolve.register
def _(event: MessageDeadLettered, state: Agents, position: int) -> Agents:
    info = state.agents.get(event.listener)
    if info is not None:
        info.dead_lettered += 1
    return state


# ------------------------------------------------------------------ decisions


def pause(state: Agents, agent: str, *, at: float, by: str, reason: str = ""
          ) -> AgentPaused | None:
    """The event that pauses ``agent``, or None if it is paused already."""
    info = state.agents.get(agent)
    if info is not None and info.status == "paused":
        return None
    return AgentPaused(at=at, agent=agent, by=by, reason=reason)


def resume(state: Agents, agent: str, *, at: float, by: str) -> AgentResumed | None:
    """The event that resumes ``agent``, or None if it is not paused."""
    info = state.agents.get(agent)
    if info is None or info.status != "paused":
        return None
    return AgentResumed(at=at, agent=agent, by=by)

"""Token budgets ("gas gauges") and usage: a pure fold over the log.

Budgets count every token ever used (they are never reset); ``usage`` counts since the last
``UsageReset``. Limits come from the organism (``budgets:`` defaults and each listener's
``budget:``) and from ``BudgetRaised``. A reservation (``TokensReserved``) holds tokens until the
``TokensUsed`` that settles it. The per-thread entries (gauges, usage, recorded answers,
warnings) of a thread the threads projection forgets (``organism.retention``) are forgotten
with it; the agent, model and organism totals keep its tokens.
"""

from __future__ import annotations

from functools import singledispatch
from typing import Any

import msgspec

from xml_pipeline.events import (
    BudgetExhausted,
    BudgetRaised,
    BudgetWarned,
    Event,
    ModelResponded,
    OrganismLoaded,
    OrganismReloaded,
    TokensReserved,
    TokensUsed,
    UsageReset,
)

__all__ = ["Budgets", "Gauge", "Reservation", "UsageTotals", "evolve", "forget_threads"]


class UsageTotals(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    request_count: int = 0
    total_cost: float = 0.0
    total_latency_ms: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, event: TokensUsed) -> None:
        self.prompt_tokens += event.input_tokens
        self.completion_tokens += event.output_tokens
        self.cache_read_tokens += event.cache_read_tokens
        self.cache_creation_tokens += event.cache_creation_tokens
        self.request_count += 1
        self.total_cost += event.cost
        self.total_latency_ms += event.latency_ms


class Gauge(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """Used and reserved tokens against a limit (``None``: no limit)."""

    used: int = 0  # prompt + completion tokens, all time
    reserved: int = 0
    limit: int | None = None
    exhausted: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used - self.reserved, 0)

    @property
    def percent_used(self) -> float:
        return 0.0 if not self.limit else round(100.0 * self.used / self.limit, 2)


class Reservation(msgspec.Struct, kw_only=True):
    thread_id: str
    agent: str
    tokens: int


class Budgets(msgspec.Struct, kw_only=True):
    defaults: dict[str, int | None] = msgspec.field(default_factory=dict)
    listener_limits: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    threads: dict[str, Gauge] = msgspec.field(default_factory=dict)
    agents: dict[str, Gauge] = msgspec.field(default_factory=dict)
    #: "<thread id>|<agent>": one agent's tokens within one thread (its ``budget.thread_tokens``)
    thread_agents: dict[str, Gauge] = msgspec.field(default_factory=dict)
    organism: Gauge = msgspec.field(default_factory=Gauge)
    reservations: dict[str, Reservation] = msgspec.field(default_factory=dict)
    usage: UsageTotals = msgspec.field(default_factory=UsageTotals)
    usage_by_agent: dict[str, UsageTotals] = msgspec.field(default_factory=dict)
    usage_by_model: dict[str, UsageTotals] = msgspec.field(default_factory=dict)
    usage_by_thread: dict[str, UsageTotals] = msgspec.field(default_factory=dict)
    usage_since: float | None = None
    #: every model's usage ever: ``UsageReset`` leaves it (the metrics' token counters)
    lifetime_by_model: dict[str, UsageTotals] = msgspec.field(default_factory=dict)
    #: "<message id>#<step>" -> log position of the ModelResponded holding that answer
    responses: dict[str, int] = msgspec.field(default_factory=dict)
    #: thread id -> the keys of ``responses`` of its messages (forgotten with the thread)
    thread_responses: dict[str, list[str]] = msgspec.field(default_factory=dict)
    #: "<scope>:<key>" -> the highest warning level (75, 90, 95) recorded for it
    warnings: dict[str, int] = msgspec.field(default_factory=dict)

    def thread_gauge(self, thread_id: str) -> Gauge:
        gauge = self.threads.get(thread_id)
        if gauge is None:
            gauge = Gauge(limit=self.defaults.get("thread_tokens"))
            self.threads[thread_id] = gauge
        return gauge

    def thread_gauge_or_new(self, thread_id: str) -> Gauge:
        """The thread's gauge, or the one the fold would create (read only)."""
        return self.threads.get(thread_id) or Gauge(limit=self.defaults.get("thread_tokens"))

    def agent_gauge(self, agent: str) -> Gauge:
        gauge = self.agents.get(agent)
        if gauge is None:
            limit = self.listener_limits.get(agent, {}).get("agent_tokens")
            gauge = Gauge(limit=limit if limit is not None else self.defaults.get("agent_tokens"))
            self.agents[agent] = gauge
        return gauge


def thread_agent_gauge(state: Budgets, thread_id: str, agent: str) -> Gauge:
    key = f"{thread_id}|{agent}"
    gauge = state.thread_agents.get(key)
    if gauge is None:
        gauge = Gauge(limit=state.listener_limits.get(agent, {}).get("thread_tokens"))
        state.thread_agents[key] = gauge
    return gauge


@singledispatch
def evolve(event: Event, state: Budgets, position: int) -> Budgets:
    return state


def _load(state: Budgets, budgets: dict[str, int | None],
          listeners: dict[str, dict[str, Any]]) -> None:
    state.defaults = dict(budgets)
    state.listener_limits = {name: dict(cfg.get("budget") or {}) for name, cfg in
                             listeners.items()}
    state.organism.limit = budgets.get("organism_tokens")


@evolve.register
def _(event: OrganismLoaded, state: Budgets, position: int) -> Budgets:
    _load(state, event.budgets, event.listeners)
    return state


@evolve.register
def _(event: OrganismReloaded, state: Budgets, position: int) -> Budgets:
    _load(state, event.budgets, event.listeners)
    return state


@evolve.register
def _(event: TokensReserved, state: Budgets, position: int) -> Budgets:
    if event.reservation_id in state.reservations:
        return state
    state.reservations[event.reservation_id] = Reservation(
        thread_id=event.thread_id, agent=event.agent, tokens=event.tokens)
    for gauge in (state.thread_gauge(event.thread_id), state.agent_gauge(event.agent),
                  state.organism, thread_agent_gauge(state, event.thread_id, event.agent)):
        gauge.reserved += event.tokens
    return state


@evolve.register
def _(event: TokensUsed, state: Budgets, position: int) -> Budgets:
    held = state.reservations.pop(event.reservation_id, None) if event.reservation_id else None
    tokens = event.input_tokens + event.output_tokens
    thread = state.thread_gauge(event.thread_id)
    agent = state.agent_gauge(event.agent)
    for gauge in (thread, agent, state.organism,
                  thread_agent_gauge(state, event.thread_id, event.agent)):
        gauge.used += tokens
        gauge.prompt_tokens += event.input_tokens
        gauge.completion_tokens += event.output_tokens
    if held is not None:
        for gauge in (state.thread_gauge(held.thread_id), state.agent_gauge(held.agent),
                      state.organism, thread_agent_gauge(state, held.thread_id, held.agent)):
            gauge.reserved -= held.tokens
    state.usage.add(event)
    for table, key in ((state.usage_by_agent, event.agent), (state.usage_by_model, event.model),
                       (state.usage_by_thread, event.thread_id),
                       (state.lifetime_by_model, event.model)):
        totals = table.get(key)
        if totals is None:
            totals = table[key] = UsageTotals()
        totals.add(event)
    return state


def _gauge_of(state: Budgets, scope: str, key: str) -> Gauge | None:
    if scope == "thread":
        return state.thread_gauge(key)
    if scope == "agent":
        return state.agent_gauge(key)
    if scope == "organism":
        return state.organism
    if scope == "thread-agent" and "|" in key:
        thread_id, _, agent = key.partition("|")
        return thread_agent_gauge(state, thread_id, agent)
    return None


@evolve.register
def _(event: BudgetExhausted, state: Budgets, position: int) -> Budgets:
    gauge = _gauge_of(state, event.scope, event.key)
    if gauge is not None:
        gauge.exhausted = True
    return state


@evolve.register
def _(event: BudgetRaised, state: Budgets, position: int) -> Budgets:
    gauge = _gauge_of(state, event.scope, event.key)
    if gauge is not None:
        gauge.limit = event.max_tokens
        gauge.exhausted = False
        state.warnings.pop(f"{event.scope}:{event.key}", None)
    return state


@evolve.register
def _(event: ModelResponded, state: Budgets, position: int) -> Budgets:
    if event.key not in state.responses:
        state.responses[event.key] = position
        state.thread_responses.setdefault(event.thread_id, []).append(event.key)
    return state


@evolve.register
def _(event: BudgetWarned, state: Budgets, position: int) -> Budgets:
    key = f"{event.scope}:{event.key}"
    state.warnings[key] = max(state.warnings.get(key, 0), event.percent)
    return state


@evolve.register
def _(event: UsageReset, state: Budgets, position: int) -> Budgets:
    state.usage = UsageTotals()
    state.usage_by_agent.clear()
    state.usage_by_model.clear()
    state.usage_by_thread.clear()
    state.usage_since = event.at
    return state


def forget_threads(state: Budgets, thread_ids: list[str]) -> None:
    """Drop every per-thread entry of ``thread_ids`` (threads that ended long ago)."""
    agents = list(state.agents)
    for thread_id in thread_ids:
        state.threads.pop(thread_id, None)
        state.usage_by_thread.pop(thread_id, None)
        state.warnings.pop(f"thread:{thread_id}", None)
        for agent in agents:
            key = f"{thread_id}|{agent}"
            if state.thread_agents.pop(key, None) is not None:
                state.warnings.pop(f"thread-agent:{key}", None)
        for key in state.thread_responses.pop(thread_id, ()):
            state.responses.pop(key, None)

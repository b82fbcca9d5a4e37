"""Token budgets ("gas gauges") and usage: a pure fold over the log.

Budgets count every token ever used (they are never reset); ``usage`` counts since the last
``UsageReset``. Limits come from the organism (``budgets:`` defaults and each listener's
``budget:``) and from ``BudgetRaised``. A reservation (``TokensReserved``) holds tokens until the
``TokensUsed`` that settles it. A call that a budget refused (``BudgetExhausted``) waits in
``holds`` until a raise frees it (``BudgetRaised`` not naming it in ``held``), it is made
(``TokensReserved``) or its thread is killed; ``blocking`` says which gauge holds it now and
``raised`` decides which waiting calls a raise frees. The per-thread entries (gauges, usage,
recorded answers, warnings, holds) of a thread the threads projection forgets
(``organism.retention``) are forgotten with it; the agent, model and organism totals keep its
tokens.
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
    ThreadKilled,
    TokensReserved,
    TokensUsed,
    UsageReset,
)

__all__ = [
    "SCOPES",
    "Blocker",
    "Budgets",
    "Gauge",
    "Hold",
    "Reservation",
    "UsageTotals",
    "blocking",
    "evolve",
    "forget_threads",
    "gauges",
    "raised",
    "waiting",
]

#: The budgets a call counts against, in the order they are checked (and listed).
SCOPES = ("thread", "thread-agent", "agent", "organism")


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


class Hold(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """A call that a budget refused and that waits: the ``BudgetExhausted`` that parked it."""

    scope: str
    key: str
    requested: int


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
    #: thread id -> agent -> the call of that agent a budget holds (its thread is paused)
    holds: dict[str, dict[str, Hold]] = msgspec.field(default_factory=dict)

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

    def agent_gauge_or_new(self, agent: str) -> Gauge:
        """The agent's gauge, or the one the fold would create (read only)."""
        gauge = self.agents.get(agent)
        if gauge is not None:
            return gauge
        limit = self.listener_limits.get(agent, {}).get("agent_tokens")
        return Gauge(limit=limit if limit is not None else self.defaults.get("agent_tokens"))

    def thread_agent_gauge_or_new(self, thread_id: str, agent: str) -> Gauge:
        """``agent``'s gauge within ``thread_id``, or the one the fold would create."""
        return self.thread_agents.get(f"{thread_id}|{agent}") or Gauge(
            limit=self.listener_limits.get(agent, {}).get("thread_tokens"))


def thread_agent_gauge(state: Budgets, thread_id: str, agent: str) -> Gauge:
    key = f"{thread_id}|{agent}"
    gauge = state.thread_agents.get(key)
    if gauge is None:
        gauge = Gauge(limit=state.listener_limits.get(agent, {}).get("thread_tokens"))
        state.thread_agents[key] = gauge
    return gauge


# ------------------------------------------------------------------ reading and deciding


class Blocker(msgspec.Struct, frozen=True, kw_only=True):
    """The gauge that a waiting call of ``agent`` would exceed (read only)."""

    scope: str
    key: str
    agent: str
    gauge: Gauge
    requested: int

    @property
    def needed(self) -> int:
        """The smallest limit that lets the call go on."""
        return self.gauge.used + self.gauge.reserved + self.requested


def gauges(state: Budgets, thread_id: str, agent: str, *, organism: str
           ) -> list[tuple[str, str, Gauge]]:
    """``(scope, key, gauge)`` of every budget a call of ``agent`` in ``thread_id`` counts
    against, in ``SCOPES`` order, as the fold would create them (read only)."""
    return [("thread", thread_id, state.thread_gauge_or_new(thread_id)),
            ("thread-agent", f"{thread_id}|{agent}",
             state.thread_agent_gauge_or_new(thread_id, agent)),
            ("agent", agent, state.agent_gauge_or_new(agent)),
            ("organism", organism, state.organism)]


def _covers(scope: str, key: str, thread_id: str) -> bool:
    """Whether raising ``scope`` (``key``) may free the waiting calls of ``thread_id``."""
    return scope in ("agent", "organism") or key.partition("|")[0] == thread_id


def blocking(state: Budgets, thread_id: str, agent: str, requested: int, *, organism: str,
             assuming: tuple[str, str, int] | None = None) -> Blocker | None:
    """The first gauge (``SCOPES`` order) that a call of ``agent`` in ``thread_id`` needing
    up to ``requested`` tokens would exceed, or None if every one has room; ``assuming``
    ``(scope, key, limit)``: as if that gauge's limit were ``limit``."""
    for scope, key, gauge in gauges(state, thread_id, agent, organism=organism):
        limit = gauge.limit
        if assuming is not None and assuming[0] == scope and (
                scope == "organism" or assuming[1] == key):
            limit = assuming[2]
        if limit is not None and gauge.used + gauge.reserved + requested > limit:
            shown = gauge if limit == gauge.limit else Gauge(
                used=gauge.used, reserved=gauge.reserved, limit=limit,
                exhausted=gauge.exhausted, prompt_tokens=gauge.prompt_tokens,
                completion_tokens=gauge.completion_tokens)
            return Blocker(scope=scope, key=key, agent=agent, gauge=shown, requested=requested)
    return None


def waiting(state: Budgets, thread_id: str, *, organism: str) -> list[Blocker]:
    """What holds each waiting call of ``thread_id`` now (the gauge its ``BudgetExhausted``
    named, if none is short any more)."""
    found = []
    for agent, hold in state.holds.get(thread_id, {}).items():
        blocker = blocking(state, thread_id, agent, hold.requested, organism=organism)
        if blocker is None:
            named = {scope: (key, gauge) for scope, key, gauge in
                     gauges(state, thread_id, agent, organism=organism)}
            key, gauge = named.get(hold.scope, (hold.key, Gauge()))
            blocker = Blocker(scope=hold.scope, key=key, agent=agent, gauge=gauge,
                              requested=hold.requested)
        found.append(blocker)
    return found


def raised(state: Budgets, *, scope: str, key: str, max_tokens: int, at: float, by: str,
           organism: str) -> BudgetRaised:
    """The ``BudgetRaised`` that sets the ``scope`` budget (``key``) to ``max_tokens``: it
    names in ``held`` every waiting call it covers that a budget would still refuse."""
    held = []
    for thread_id, holds in state.holds.items():
        if not _covers(scope, key, thread_id):
            continue
        for agent, hold in holds.items():
            if blocking(state, thread_id, agent, hold.requested, organism=organism,
                        assuming=(scope, key, max_tokens)) is not None:
                held.append(f"{thread_id}|{agent}")
    return BudgetRaised(at=at, scope=scope, key=key, max_tokens=max_tokens, by=by,
                        held=tuple(held))


# ------------------------------------------------------------------ the fold


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
    _release(state, event.thread_id, event.agent)  # a waiting call of this agent is made
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
    state.holds.setdefault(event.thread_id, {})[event.agent] = Hold(
        scope=event.scope, key=event.key, requested=event.requested)
    return state


@evolve.register
def _(event: BudgetRaised, state: Budgets, position: int) -> Budgets:
    gauge = _gauge_of(state, event.scope, event.key)
    if gauge is not None:
        gauge.limit = event.max_tokens
        gauge.exhausted = False
        state.warnings.pop(f"{event.scope}:{event.key}", None)
    held = set(event.held)
    for thread_id in [t for t in state.holds if _covers(event.scope, event.key, t)]:
        for agent in list(state.holds[thread_id]):
            if f"{thread_id}|{agent}" not in held:
                _release(state, thread_id, agent)
    return state


@evolve.register
def _(event: ThreadKilled, state: Budgets, position: int) -> Budgets:
    state.holds.pop(event.thread_id, None)
    return state


def _release(state: Budgets, thread_id: str, agent: str) -> None:
    holds = state.holds.get(thread_id)
    if holds is not None and holds.pop(agent, None) is not None and not holds:
        del state.holds[thread_id]


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
        state.holds.pop(thread_id, None)
        state.usage_by_thread.pop(thread_id, None)
        state.warnings.pop(f"thread:{thread_id}", None)
        for agent in agents:
            key = f"{thread_id}|{agent}"
            if state.thread_agents.pop(key, None) is not None:
                state.warnings.pop(f"thread-agent:{key}", None)
        for key in state.thread_responses.pop(thread_id, ()):
            state.responses.pop(key, None)

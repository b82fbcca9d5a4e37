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
from xml_pipeline.state.budget_keys import (
    SCOPES,
    AgentKey,
    BudgetKey,
    OrganismKey,
    ThreadAgentKey,
    ThreadKey,
    parse_key,
)
from xml_pipeline.state.gauges import Blocker, Gauge, Hold, Reservation, UsageTotals

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


class Budgets(msgspec.Struct, kw_only=True):
    defaults: dict[str, int | None] = msgspec.field(default_factory=dict)
    listener_limits: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    threads: dict[str, Gauge] = msgspec.field(default_factory=dict)
    agents: dict[str, Gauge] = msgspec.field(default_factory=dict)
    #: ``ThreadAgentKey.key``: one agent's tokens within one thread (its ``budget.thread_tokens``)
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
    #: ``str(BudgetKey)`` -> the highest warning level (75, 90, 95) recorded for it
    warnings: dict[str, int] = msgspec.field(default_factory=dict)
    #: thread id -> agent -> the call of that agent a budget holds (its thread is paused)
    holds: dict[str, dict[str, Hold]] = msgspec.field(default_factory=dict)

    def gauge(self, budget: BudgetKey) -> Gauge:
        """The gauge of ``budget``, or the one the fold would create for it (read only)."""
        if isinstance(budget, OrganismKey):
            return self.organism
        gauge = _table(self, budget).get(budget.key)
        return _new_gauge(self, budget) if gauge is None else gauge


def _table(state: Budgets, budget: ThreadKey | ThreadAgentKey | AgentKey) -> dict[str, Gauge]:
    if isinstance(budget, ThreadKey):
        return state.threads
    return state.thread_agents if isinstance(budget, ThreadAgentKey) else state.agents


def _new_gauge(state: Budgets, budget: ThreadKey | ThreadAgentKey | AgentKey) -> Gauge:
    """The gauge the fold creates for ``budget``: its limit is organism.yaml's ``budgets:``
    default, or for an agent the listener's ``budget:`` (an agent's budget within a thread
    has only the listener's ``thread_tokens``)."""
    if isinstance(budget, ThreadKey):
        return Gauge(limit=state.defaults.get("thread_tokens"))
    own = state.listener_limits.get(budget.agent, {})
    if isinstance(budget, ThreadAgentKey):
        return Gauge(limit=own.get("thread_tokens"))
    limit = own.get("agent_tokens")
    return Gauge(limit=limit if limit is not None else state.defaults.get("agent_tokens"))


def _gauge(state: Budgets, budget: BudgetKey) -> Gauge:
    """The gauge of ``budget``, created (as ``Budgets.gauge`` shows it) if it is new."""
    if isinstance(budget, OrganismKey):
        return state.organism
    table = _table(state, budget)
    gauge = table.get(budget.key)
    if gauge is None:
        gauge = table[budget.key] = _new_gauge(state, budget)
    return gauge


# ------------------------------------------------------------------ reading and deciding


def gauges(state: Budgets, thread_id: str, agent: str, *, organism: str
           ) -> list[tuple[BudgetKey, Gauge]]:
    """``(budget, gauge)`` of every budget a call of ``agent`` in ``thread_id`` counts
    against, in ``SCOPES`` order, as the fold would create them (read only)."""
    keys: tuple[BudgetKey, ...] = (ThreadKey(thread_id), ThreadAgentKey(thread_id, agent),
                                   AgentKey(agent), OrganismKey(organism))
    return [(budget, state.gauge(budget)) for budget in keys]


def blocking(state: Budgets, thread_id: str, agent: str, requested: int, *, organism: str,
             assuming: tuple[BudgetKey, int] | None = None) -> Blocker | None:
    """The first gauge (``SCOPES`` order) that a call of ``agent`` in ``thread_id`` needing
    up to ``requested`` tokens would exceed, or None if every one has room; ``assuming``
    ``(budget, limit)``: as if that budget's limit were ``limit``."""
    for budget, gauge in gauges(state, thread_id, agent, organism=organism):
        limit = gauge.limit
        if assuming is not None and assuming[0] == budget:
            limit = assuming[1]
        if limit is not None and gauge.used + gauge.reserved + requested > limit:
            shown = gauge if limit == gauge.limit else Gauge(
                used=gauge.used, reserved=gauge.reserved, limit=limit,
                exhausted=gauge.exhausted, prompt_tokens=gauge.prompt_tokens,
                completion_tokens=gauge.completion_tokens)
            return Blocker(budget=budget, agent=agent, gauge=shown, requested=requested)
    return None


def waiting(state: Budgets, thread_id: str, *, organism: str) -> list[Blocker]:
    """What holds each waiting call of ``thread_id`` now (the gauge its ``BudgetExhausted``
    named, if none is short any more)."""
    found = []
    for agent, hold in state.holds.get(thread_id, {}).items():
        blocker = blocking(state, thread_id, agent, hold.requested, organism=organism)
        if blocker is None:
            named = {budget.scope: (budget, gauge) for budget, gauge in
                     gauges(state, thread_id, agent, organism=organism)}
            if hold.scope not in named:
                continue  # a hold that names no budget (a hand-written record)
            budget, gauge = named[hold.scope]
            blocker = Blocker(budget=budget, agent=agent, gauge=gauge,
                              requested=hold.requested)
        found.append(blocker)
    return found


def raised(state: Budgets, *, scope: str, key: str, max_tokens: int, at: float, by: str,
           organism: str) -> BudgetRaised:
    """The ``BudgetRaised`` that sets the ``scope`` budget (``key``) to ``max_tokens``: it
    names in ``held`` every waiting call it covers that a budget would still refuse."""
    budget = parse_key(scope, key)
    held = []
    for thread_id, holds in state.holds.items():
        if budget is None or not budget.covers(thread_id):
            continue
        for agent, hold in holds.items():
            if blocking(state, thread_id, agent, hold.requested, organism=organism,
                        assuming=(budget, max_tokens)) is not None:
                held.append(ThreadAgentKey(thread_id, agent).key)
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
    for gauge in _counted(state, event.thread_id, event.agent):
        gauge.reserved += event.tokens
    return state


@evolve.register
def _(event: TokensUsed, state: Budgets, position: int) -> Budgets:
    held = state.reservations.pop(event.reservation_id, None) if event.reservation_id else None
    tokens = event.input_tokens + event.output_tokens
    for gauge in _counted(state, event.thread_id, event.agent):
        gauge.used += tokens
        gauge.prompt_tokens += event.input_tokens
        gauge.completion_tokens += event.output_tokens
    if held is not None:
        for gauge in _counted(state, held.thread_id, held.agent):
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


@evolve.register
def _(event: BudgetExhausted, state: Budgets, position: int) -> Budgets:
    budget = parse_key(event.scope, event.key)
    if budget is not None:
        _gauge(state, budget).exhausted = True
    state.holds.setdefault(event.thread_id, {})[event.agent] = Hold(
        scope=event.scope, key=event.key, requested=event.requested)
    return state


@evolve.register
def _(event: BudgetRaised, state: Budgets, position: int) -> Budgets:
    budget = parse_key(event.scope, event.key)
    if budget is None:
        return state  # names no budget (a hand-written record): it sets and frees nothing
    gauge = _gauge(state, budget)
    gauge.limit = event.max_tokens
    gauge.exhausted = False
    state.warnings.pop(str(budget), None)
    held = set(event.held)
    for thread_id in [t for t in state.holds if budget.covers(t)]:
        for agent in list(state.holds[thread_id]):
            if ThreadAgentKey(thread_id, agent).key not in held:
                _release(state, thread_id, agent)
    return state


@evolve.register
def _(event: ThreadKilled, state: Budgets, position: int) -> Budgets:
    state.holds.pop(event.thread_id, None)
    return state


def _counted(state: Budgets, thread_id: str, agent: str) -> tuple[Gauge, ...]:
    """The gauges a call of ``agent`` in ``thread_id`` counts against (created if new)."""
    return (_gauge(state, ThreadKey(thread_id)), _gauge(state, AgentKey(agent)), state.organism,
            _gauge(state, ThreadAgentKey(thread_id, agent)))


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
    budget = parse_key(event.scope, event.key)
    if budget is not None:
        key = str(budget)
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
        state.warnings.pop(str(ThreadKey(thread_id)), None)
        for agent in agents:
            budget = ThreadAgentKey(thread_id, agent)
            if state.thread_agents.pop(budget.key, None) is not None:
                state.warnings.pop(str(budget), None)
        for key in state.thread_responses.pop(thread_id, ()):
            state.responses.pop(key, None)

"""The values the budgets projection keeps: gauges, usage totals, reservations, holds.

A ``Gauge`` counts the tokens used and reserved against one budget's limit; ``UsageTotals``
counts usage (of an agent, a model, a thread, all); a ``Hold`` is a call a budget refused that
waits; a ``Blocker`` (read only, never stored) is the gauge a waiting call would exceed now.
They are stored in snapshots as they are (``array_like``): changing a field changes the form.
"""

from __future__ import annotations

import msgspec

from xml_pipeline.events import TokensUsed
from xml_pipeline.state.budget_keys import BudgetKey

__all__ = ["Blocker", "Gauge", "Hold", "Reservation", "UsageTotals"]


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


class Blocker(msgspec.Struct, frozen=True, kw_only=True):
    """The gauge that a waiting call of ``agent`` would exceed (read only)."""

    budget: BudgetKey
    agent: str
    gauge: Gauge
    requested: int

    @property
    def scope(self) -> str:
        return self.budget.scope

    @property
    def key(self) -> str:
        return self.budget.key

    @property
    def needed(self) -> int:
        """The smallest limit that lets the call go on."""
        return self.gauge.used + self.gauge.reserved + self.requested

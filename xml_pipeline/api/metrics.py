"""``GET /metrics`` in the Prometheus text format (version 0.0.4).

Counters come from the projections (so they survive restarts, and no reset lowers them);
latency histograms and log figures are this process's own observations since it started.
Names follow Prometheus' rules: counters end in ``_total``, units are suffixes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from starlette.requests import Request
from starlette.responses import Response

from xml_pipeline.events import Event, HandlerSucceeded
from xml_pipeline.histogram import Histogram
from xml_pipeline.runtime.pump import Pump
from xml_pipeline.state.budgets import UsageTotals

__all__ = ["Histogram", "Observer", "metrics"]

class Observer:
    """Watches folded events for the figures the projections do not keep."""

    def __init__(self) -> None:
        self.handler_latency: dict[str, Histogram] = {}

    def __call__(self, position: int, event: Event) -> None:
        if isinstance(event, HandlerSucceeded):
            histogram = self.handler_latency.get(event.listener)
            if histogram is None:
                histogram = self.handler_latency[event.listener] = Histogram()
            histogram.observe(event.duration_ms)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(out: list[str], name: str, kind: str, help_text: str,
            samples: Iterable[tuple[str, float]]) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")


def _tokens(models: Iterable[str], usage: Mapping[str, UsageTotals]
            ) -> list[tuple[str, float]]:
    """Prompt and completion tokens of each of ``models`` in ``usage`` (0 for a model it
    does not hold), so that a series never vanishes."""
    samples: list[tuple[str, float]] = []
    for model in sorted(models):
        totals = usage.get(model) or UsageTotals()
        samples += [(f'model="{_escape(model)}",kind="prompt"', totals.prompt_tokens),
                    (f'model="{_escape(model)}",kind="completion"', totals.completion_tokens)]
    return samples


async def metrics(request: Request) -> Response:
    pump: Pump = request.app.state.pump
    observer: Observer = request.app.state.observer
    state = pump.state
    stats = pump.statistics()
    listeners = {entry.name: entry for entry in stats.listeners}
    agents = state.agents.agents
    out: list[str] = []

    def per_listener(attr: str) -> list[tuple[str, float]]:
        # Every listener the log knows (one removed by a reload keeps its counters).
        return [(f'listener="{_escape(n)}"', getattr(listeners.get(n) or a, attr))
                for n, a in agents.items()]

    _metric(out, "xml_pipeline_messages_accepted_total", "counter",
            "Messages accepted for each listener.", per_listener("accepted"))
    _metric(out, "xml_pipeline_listener_rejected_messages_total", "counter",
            "Messages addressed to each listener that the bus refused.",
            per_listener("rejected"))
    _metric(out, "xml_pipeline_messages_delivered_total", "counter",
            "Deliveries to each listener (retries included).", per_listener("delivered"))
    _metric(out, "xml_pipeline_handler_failures_total", "counter",
            "Handler calls that raised or timed out.", per_listener("failed"))
    _metric(out, "xml_pipeline_dead_letters_total", "counter",
            "Messages dead-lettered per listener.", per_listener("dead_lettered"))
    _metric(out, "xml_pipeline_bus_rejected_messages_total", "counter",
            "Every message the bus refused, those addressed to no listener it has included.",
            [("", stats.rejected)])
    depth, in_flight = [], []
    for entry in stats.listeners:
        depth.append((f'listener="{_escape(entry.name)}"', entry.queued))
        in_flight.append((f'listener="{_escape(entry.name)}"', entry.in_flight))
    _metric(out, "xml_pipeline_mailbox_depth", "gauge", "Messages waiting in each mailbox.",
            depth)
    _metric(out, "xml_pipeline_in_flight", "gauge", "Handler calls running per listener.",
            in_flight)
    out.append("# HELP xml_pipeline_handler_seconds Handler duration of successful calls.")
    out.append("# TYPE xml_pipeline_handler_seconds histogram")
    for name, histogram in sorted(observer.handler_latency.items()):
        out.extend(histogram.lines("xml_pipeline_handler_seconds",
                                   f'listener="{_escape(name)}"'))
    out.append("# HELP xml_pipeline_log_append_seconds Time from append to durable and folded.")
    out.append("# TYPE xml_pipeline_log_append_seconds histogram")
    out.extend(pump.append_latency.lines("xml_pipeline_log_append_seconds", ""))
    log = stats.log
    _metric(out, "xml_pipeline_log_position", "gauge", "Position of the last durable event.",
            [("", log.last_position)])
    _metric(out, "xml_pipeline_log_batches_total", "counter", "Write batches (group commits).",
            [("", log.batches)])
    _metric(out, "xml_pipeline_log_fsyncs_total", "counter", "fsync calls.",
            [("", log.fsyncs)])
    _metric(out, "xml_pipeline_log_largest_batch_records", "gauge",
            "Most records in one write batch.", [("", log.largest_batch)])
    _metric(out, "xml_pipeline_log_mean_batch_records", "gauge",
            "Mean records per write batch.",
            [("", round(log.appended / log.batches, 3) if log.batches else 0)])
    budgets = state.budgets
    # The counter is every token ever used; POST /usage/reset starts only the gauge again.
    _metric(out, "xml_pipeline_tokens_total", "counter", "LLM tokens used, ever.",
            _tokens(budgets.lifetime_by_model, budgets.lifetime_by_model))
    _metric(out, "xml_pipeline_usage_tokens", "gauge",
            "LLM tokens used since the last usage reset (POST /api/v1/usage/reset).",
            _tokens(budgets.lifetime_by_model, budgets.usage_by_model))
    return Response("\n".join(out) + "\n",
                    media_type="text/plain; version=0.0.4; charset=utf-8")

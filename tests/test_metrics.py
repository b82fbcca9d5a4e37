"""``GET /metrics``: read with ``prometheus_client``'s own parser, as a scraper would.

Every family parses, has HELP and the TYPE its name promises (counters end in ``_total``,
gauges do not, units are suffixes); counters never go down, ``POST /usage/reset`` included.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests import handlers
from tests.api_server import client, running_server
from tests.conftest import write_organism
from tests.test_pump import ITEM_XSD, ORGANISM
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.events import TokensUsed
from xml_pipeline.log.file import open_file_log

#: name -> type of every family the endpoint serves (as the parser names them: a counter's
#: family drops the ``_total`` of its samples).
FAMILIES = {
    "xml_pipeline_messages_accepted": "counter",
    "xml_pipeline_listener_rejected_messages": "counter",
    "xml_pipeline_bus_rejected_messages": "counter",
    "xml_pipeline_messages_delivered": "counter",
    "xml_pipeline_handler_failures": "counter",
    "xml_pipeline_dead_letters": "counter",
    "xml_pipeline_mailbox_depth": "gauge",
    "xml_pipeline_in_flight": "gauge",
    "xml_pipeline_handler_seconds": "histogram",
    "xml_pipeline_log_append_seconds": "histogram",
    "xml_pipeline_log_position": "gauge",
    "xml_pipeline_log_batches": "counter",
    "xml_pipeline_log_fsyncs": "counter",
    "xml_pipeline_log_largest_batch_records": "gauge",
    "xml_pipeline_log_mean_batch_records": "gauge",
    "xml_pipeline_tokens": "counter",
    "xml_pipeline_usage_tokens": "gauge",
}


@pytest.fixture
def organism(tmp_path: Path) -> Organism:
    handlers.reset()
    return load_organism(write_organism(tmp_path / "org", ORGANISM,
                                        schemas={"item.xsd": ITEM_XSD}))


async def scrape(http: httpx.AsyncClient, base: str) -> dict[str, tuple[str, list[Sample]]]:
    """Each family's type and samples, by family name, as ``prometheus_client`` parses them."""
    response = await http.get(base + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name not in families, f"{family.name} is served twice"
        assert family.documentation, f"{family.name} has no HELP"
        families[family.name] = (family.type, family.samples)
    return families


def value(families: dict[str, tuple[str, list[Sample]]], name: str, **labels: str) -> float:
    [found] = [s.value for s in families[name][1] if s.labels == labels]
    return found


async def test_every_family_parses_with_the_type_and_name_it_promises(
        organism: Organism, tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        assert (await http.post("/inject", json={"to": "first", "payload": {"n": "1"}})
                ).status_code == 202
        await http.get("/organism/state")
        families = await scrape(http, base)
    assert {name: kind for name, (kind, _) in families.items()} == FAMILIES
    for name, (kind, samples) in families.items():
        for sample in samples:
            if kind == "counter":
                assert sample.name == name + "_total"
            elif kind == "gauge":
                assert sample.name == name and not name.endswith("_total")
    # The batch figures say their unit; a mean of 1 record per batch is a figure, not a count.
    assert value(families, "xml_pipeline_log_largest_batch_records") >= 1
    assert value(families, "xml_pipeline_log_mean_batch_records") >= 1


async def test_the_two_rejection_families_count_different_things(
        organism: Organism, tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        # A message for a listener the organism does not have: refused by the bus, at no
        # listener. A payload that does not fit third's schema: refused at third.
        assert (await http.post("/inject", json={"to": "nobody", "payload": {"n": "1"}})
                ).status_code == 404
        assert (await http.post("/inject", json={"to": "third", "payload": "<Nope/>"})
                ).status_code == 422
        families = await scrape(http, base)
    assert value(families, "xml_pipeline_bus_rejected_messages") == 2
    assert value(families, "xml_pipeline_listener_rejected_messages", listener="third") == 1
    assert sum(s.value for s in families["xml_pipeline_listener_rejected_messages"][1]) == 1


async def test_the_token_counter_survives_a_usage_reset_and_a_restart(
        organism: Organism, tmp_path: Path) -> None:
    data = tmp_path / "events"
    log = await open_file_log(data)
    await log.append([
        TokensUsed(at=1.0, thread_id="t-1", agent="third", model="model-x", input_tokens=100,
                   output_tokens=20),
        TokensUsed(at=2.0, thread_id="t-2", agent="third", model="model-y", input_tokens=7,
                   output_tokens=3),
    ])
    await log.aclose()
    counted = {("model-x", "prompt"): 100, ("model-x", "completion"): 20,
               ("model-y", "prompt"): 7, ("model-y", "completion"): 3}

    def figures(families: dict[str, tuple[str, list[Sample]]], name: str
                ) -> dict[tuple[str, str], float]:
        return {(s.labels["model"], s.labels["kind"]): s.value for s in families[name][1]}

    async with running_server(organism, data) as (base, _), client(base) as http:
        before = await scrape(http, base)
        assert figures(before, "xml_pipeline_tokens") == counted
        assert figures(before, "xml_pipeline_usage_tokens") == counted
        assert (await http.post("/usage/reset")).json() == {"success": True}
        after = await scrape(http, base)
        # The counter never goes down; the figure since the last reset starts again at 0.
        assert figures(after, "xml_pipeline_tokens") == counted
        assert figures(after, "xml_pipeline_usage_tokens") == dict.fromkeys(counted, 0)
    async with running_server(organism, data) as (base, _), client(base) as http:
        restarted = await scrape(http, base)
        assert figures(restarted, "xml_pipeline_tokens") == counted
        assert figures(restarted, "xml_pipeline_usage_tokens") == dict.fromkeys(counted, 0)

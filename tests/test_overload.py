"""Bounded under load: a cap on requests in progress, bounded idempotency keys, and ended
threads forgotten beyond the retention (answered with a pointer to the log)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests import handlers
from tests.api_server import client, running_server
from tests.conftest import write_organism
from tests.test_api import _sse_until
from tests.test_pump import ITEM_XSD, ORGANISM
from xml_pipeline.log.file import open_file_log
from xml_pipeline.organism import Organism, load_organism
from xml_pipeline.state import replay

LIMITED = ORGANISM.replace(
    "organism: {name: pump-test}",
    "organism: {name: pump-test, api: {max_requests: 2}, "
    "retention: {ended_threads: 0, idempotency_keys: 3}}")


@pytest.fixture
def organism(tmp_path: Path) -> Organism:
    handlers.reset()
    return load_organism(write_organism(tmp_path / "org", LIMITED,
                                        schemas={"item.xsd": ITEM_XSD}))


def item(n: object) -> str:
    return f"<Item><n>{n}</n></Item>"


async def held_body(release: asyncio.Event, sent: asyncio.Event) -> AsyncIterator[bytes]:
    """A request body that is not finished until ``release`` is set; ``sent`` is set once
    the client has written its headers and first part."""
    yield b'{"to": "third", '
    sent.set()
    await release.wait()
    yield b'"payload": "<Item><n>held</n></Item>"}'


async def until_busy(http: httpx.AsyncClient) -> httpx.Response | None:
    """The first 503 of ``GET /agents``. The held requests were sent before; each probe is a
    round trip, in which the server reads what reached it (bounded, to fail not hang)."""
    for _ in range(1000):
        answer = await http.get("/agents")
        if answer.status_code == 503:
            return answer
        assert answer.status_code == 200
    return None


async def test_requests_beyond_max_requests_get_503_with_retry_after(
        organism: Organism, tmp_path: Path) -> None:
    release = asyncio.Event()
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http, client(base) as held_a, client(base) as held_b:
        headers = {"Content-Type": "application/json"}
        sent = [asyncio.Event(), asyncio.Event()]
        held = [asyncio.ensure_future(c.post("/inject", content=held_body(release, s),
                                             headers=headers))
                for c, s in zip((held_a, held_b), sent, strict=True)]
        for event in sent:
            await event.wait()
        busy = await until_busy(http)
        assert busy is not None, "two requests in progress never made the server busy"
        error = busy.json()["error"]
        assert error["code"] == "busy" and "max_requests" in error["message"]
        assert busy.headers["Retry-After"] == "1"
        # Refused before its body was read, and so not recorded; monitoring still answers.
        refused = await http.post("/inject", json={"to": "third", "payload": item(1)})
        assert refused.status_code == 503
        assert (await http.get(base + "/health")).status_code == 200
        release.set()
        answers = await asyncio.gather(*held)
        assert [a.status_code for a in answers] == [202, 202]
        # The slots are free again.
        assert (await http.post("/inject", json={"to": "third", "payload": item(2)})
                ).status_code == 202
        # Every counted operation documents the 503; the event stream is not counted.
        paths = (await http.get("/openapi.json")).json()["paths"]
        assert "503" in paths["/agents"]["get"]["responses"]
        assert "503" not in paths["/events"]["get"]["responses"]
        assert (await http.get("/organism/state")).json()["idle"]
    log = await open_file_log(tmp_path / "events", readonly=True)
    state = await replay(log)
    await log.aclose()
    assert (state.threads.accepted, state.threads.rejected) == (3, 0)


async def test_idempotency_keys_are_capped_in_length_and_number(
        organism: Organism, tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http:
        long = await http.post("/inject", json={"to": "third", "payload": item(0),
                                                "idempotency_key": "k" * 257})
        assert long.status_code == 400
        assert "idempotency key is 257 characters" in long.json()["error"]["message"]
        first = await http.post("/inject", json={"to": "third", "payload": item(1),
                                                 "idempotency_key": "k" * 256})
        again = await http.post("/inject", json={"to": "third", "payload": item(1),
                                                 "idempotency_key": "k" * 256})
        assert first.status_code == 202 and again.json() == first.json()
        for n in range(40):  # many newer keys: the oldest are forgotten
            assert (await http.post("/inject", json={"to": "third", "payload": item(n),
                                                     "idempotency_key": f"key-{n}"})
                    ).status_code == 202
        late = await http.post("/inject", json={"to": "third", "payload": item(1),
                                                "idempotency_key": "k" * 256})
        assert late.status_code == 202 and late.json() != first.json()
        newest = await http.post("/inject", json={"to": "third", "payload": item(39),
                                                  "idempotency_key": "key-39"})
        assert newest.json()["message_id"] != late.json()["message_id"]
    log = await open_file_log(tmp_path / "events", readonly=True)
    state = await replay(log)
    await log.aclose()
    assert state.threads.rejected == 1  # the overlong key is recorded as refused input
    assert len(state.threads.idempotency) <= 3 + 16
    assert "key-39" in state.threads.idempotency


async def test_a_forgotten_thread_points_at_the_log(organism: Organism,
                                                    tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http:
        ids = [(await http.post("/inject", json={"to": "third", "payload": item(n)})).json()
               for n in range(40)]
        assert (await http.get("/organism/state")).json()["idle"]
        listed = (await http.get("/threads")).json()
        assert listed["total"] <= 16  # ended_threads: 0, trimmed in batches of 16
        first = ids[0]["thread_id"]
        missing = await http.get(f"/threads/{first}")
        assert missing.status_code == 404
        message = missing.json()["error"]["message"]
        assert "retention.ended_threads" in message and "/api/v1/events?thread=" in message
        # The log still has the whole thread.
        events = await _sse_until(http, {"after": 0, "thread": first}, "ThreadCompleted")
        assert [e["type"] for e in events][-1] == "ThreadCompleted"
        assert any(e["type"] == "MessageAccepted" and e["data"]["message_id"] ==
                   ids[0]["message_id"] for e in events)


async def test_a_reload_changes_max_requests_and_names_what_waits_for_a_restart(
        organism: Organism, tmp_path: Path) -> None:
    release = asyncio.Event()
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http, client(base) as held_client:
        organism.path.write_text(organism.path.read_text().replace(
            "api: {max_requests: 2}", "api: {max_requests: 1, port: 9999}"))
        answer = (await http.post("/organism/reload")).json()
        assert answer["success"] and answer["restart_needed"] == ["api.port"]
        sent = asyncio.Event()
        held = asyncio.ensure_future(held_client.post(
            "/inject", content=held_body(release, sent),
            headers={"Content-Type": "application/json"}))
        await sent.wait()
        busy = await until_busy(http)  # one request in progress is now enough
        assert busy is not None and "handling 1 requests" in busy.json()["error"]["message"]
        release.set()
        assert (await held).status_code == 202

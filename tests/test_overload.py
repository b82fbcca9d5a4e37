"""Bounded under load: a cap on requests in progress, bounded idempotency keys, and ended
threads forgotten beyond the retention (answered with a pointer to the log)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import handlers
from tests.api_server import client, running_server
from tests.conftest import write_organism
from tests.test_api import _sse_until
from tests.test_pump import ITEM_XSD, ORGANISM
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.errors import OrganismError
from xml_pipeline.events import MessageRejected
from xml_pipeline.log.file import open_file_log
from xml_pipeline.runtime.pump import Pump
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


class Gate:
    """Holds ``POST /inject`` requests whose payload says ``held`` inside the pump's inject
    (their body is complete: they are being handled) until ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = 0
        self._changed = asyncio.Event()

    async def wait_held(self, count: int) -> None:
        while self.held < count:
            self._changed.clear()
            await self._changed.wait()

    async def hold(self) -> None:
        self.held += 1
        self._changed.set()
        await self.release.wait()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate()
    inject = Pump.inject

    async def held_inject(self: Pump, data: Any, **options: Any) -> Any:
        if "held" in str(data):
            await gate.hold()
        return await inject(self, data, **options)

    monkeypatch.setattr(Pump, "inject", held_inject)
    return gate


async def test_requests_beyond_max_requests_get_503_with_retry_after(
        organism: Organism, tmp_path: Path, gate: Gate) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http, client(base) as held_a, client(base) as held_b:
        held = [asyncio.ensure_future(c.post("/inject", json={"to": "third",
                                                              "payload": item("held")}))
                for c in (held_a, held_b)]
        await gate.wait_held(2)
        busy = await http.get("/agents")
        assert busy.status_code == 503
        error = busy.json()["error"]
        assert error["code"] == "busy"
        assert error["message"] == ("The server is handling 2 requests already "
                                    "(organism.api.max_requests); retry after Retry-After "
                                    "seconds.")
        assert busy.headers["Retry-After"] == "1"
        # Refused before its body was read, and so not recorded; monitoring still answers.
        refused = await http.post("/inject", json={"to": "third", "payload": item(1)})
        assert refused.status_code == 503
        assert (await http.get(base + "/health")).status_code == 200
        gate.release.set()
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


# ------------------------------------------------------------------ slow and huge bodies

SLOW_HEAD = ("POST /api/v1/inject?to=third HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             "Content-Type: application/xml\r\nContent-Length: {length}\r\n{extra}\r\n")
TOKEN = "overload-test-token"


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error


async def open_slow(base: str, *, length: int = 100, part: bytes = b"<Item><n>",
                    token: str | None = None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection that sent the headers of ``POST /inject`` and ``part`` of its body."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    extra = f"Authorization: Bearer {token}\r\n" if token else ""
    writer.write(SLOW_HEAD.format(length=length, extra=extra).encode() + part)
    await writer.drain()
    return reader, writer


async def answer_of(reader: asyncio.StreamReader) -> Answer:
    """The response on a raw connection; a bound, so that a server that never answers fails
    the test instead of hanging it."""
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(lines[0].split()[1]), headers, body)


def limited(tmp_path: Path, api: str) -> Organism:
    return load_organism(write_organism(
        tmp_path / "org", ORGANISM.replace("organism: {name: pump-test}",
                                           f"organism: {{name: pump-test, api: {{{api}}}}}"),
        schemas={"item.xsd": ITEM_XSD}))


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no token", "token"])
async def test_slow_bodies_take_no_slot_that_reads_and_fast_clients_need(
        tmp_path: Path, token: str | None) -> None:
    organism = limited(tmp_path, "max_requests: 2, body_timeout: 10m")
    async with running_server(organism, tmp_path / "events", token=token) as (base, _), \
            client(base, token) as http:
        slow = [await open_slow(base, token=token) for _ in range(6)]
        # Two bodies may be in transit at once; the other four are refused at once, which
        # also shows that all six reached the server.
        pending = {asyncio.ensure_future(answer_of(reader)) for reader, _ in slow}
        refused: list[Answer] = []
        while len(refused) < 4:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            refused += [task.result() for task in done]
        assert len(refused) == 4 and len(pending) == 2
        for answer in refused:
            assert (answer.status, answer.error()["code"]) == (503, "busy")
            assert answer.error()["message"] == (
                "The server is receiving 2 request bodies already (organism.api.max_requests); "
                "retry after Retry-After seconds.")
            assert answer.headers["connection"] == "close"
        # Reads and fast writes are answered while the slow bodies stay open.
        for _ in range(5):
            assert (await http.get("/agents")).status_code == 200
        fast = await http.post("/inject", json={"to": "third", "payload": item("fast")})
        assert fast.status_code == 202
        assert not any(task.done() for task in pending)
        for task in pending:
            task.cancel()
        for _, writer in slow:
            writer.close()


async def test_a_body_that_does_not_arrive_in_time_gets_408_and_frees_its_slot(
        tmp_path: Path) -> None:
    organism = limited(tmp_path, "max_requests: 1, body_timeout: 50ms")
    data = tmp_path / "events"
    async with running_server(organism, data) as (base, _), client(base) as http:
        for part in (b"<Item><n>", b""):  # some of the body, or none of it
            reader, writer = await open_slow(base, part=part)
            answer = await answer_of(reader)
            assert (answer.status, answer.error()["code"]) == (408, "body_timeout")
            assert answer.error()["message"] == (
                "The request body did not arrive within 0.05 seconds "
                "(organism.api.body_timeout); send the whole body at once.")
            assert answer.headers["connection"] == "close"
            assert await reader.read() == b""  # and the connection is closed
            writer.close()
        # The one slot is free again.
        assert (await http.post("/inject", json={"to": "third", "payload": item(1)})
                ).status_code == 202
    log = await open_file_log(data, readonly=True)
    state = await replay(log)
    await log.aclose()
    assert (state.threads.accepted, state.threads.rejected) == (1, 0)  # load is not bad input


@pytest.mark.parametrize(("value", "shown"), [("0s", "'0s'"), ("-1", "-1"), ("soon", "'soon'")])
def test_body_timeout_must_be_a_duration_over_0(tmp_path: Path, value: str, shown: str) -> None:
    with pytest.raises(OrganismError) as info:
        limited(tmp_path, f"body_timeout: {value}")
    assert info.value.message.splitlines()[1:] == [
        f"  {tmp_path / 'org' / 'organism.yaml'}:2: organism.api.body_timeout must be a "
        f"duration over 0 such as 30s, 500ms or 2m, not {shown}."]


async def test_a_huge_content_length_on_inject_is_refused_on_the_header(
        tmp_path: Path) -> None:
    organism = limited(tmp_path, "body_timeout: 10m")
    data = tmp_path / "events"
    async with running_server(organism, data) as (base, _):
        reader, writer = await open_slow(base, length=10737418240, part=b"<Item><n>1</n")
        answer = await answer_of(reader)
        writer.close()
    assert (answer.status, answer.error()["code"]) == (413, "xml_too_large")
    assert answer.error()["message"] == ("The request body is 10737418240 bytes, over the "
                                         "limit of 1048576 bytes; send a smaller message.")
    assert answer.headers["connection"] == "close"
    log = await open_file_log(data, readonly=True)
    rejected = [r.event async for r in log.read() if isinstance(r.event, MessageRejected)]
    await log.aclose()
    assert [r.reason for r in rejected] == ["xml_too_large"]


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
        organism: Organism, tmp_path: Path, gate: Gate) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http, client(base) as held_client:
        organism.path.write_text(organism.path.read_text().replace(
            "api: {max_requests: 2}", "api: {max_requests: 1, port: 9999}"))
        answer = (await http.post("/organism/reload")).json()
        assert answer["success"] and answer["restart_needed"] == ["api.port"]
        held = asyncio.ensure_future(held_client.post(
            "/inject", json={"to": "third", "payload": item("held")}))
        await gate.wait_held(1)
        busy = await http.get("/agents")  # one request in progress is now enough
        assert busy.status_code == 503
        assert "handling 1 requests" in busy.json()["error"]["message"]
        gate.release.set()
        assert (await held).status_code == 202

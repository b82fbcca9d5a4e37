"""The HTTP API end to end, against a real uvicorn server on a free port: every endpoint acts
on the real pump; bad input gets its own status and is recorded; auth is header-only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import handlers
from tests.api_server import client, running_server
from tests.conftest import write_organism
from tests.test_pump import ITEM_XSD, ORGANISM
from xml_pipeline.api.server import UnsafeBindError, config
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.events import MessageRejected
from xml_pipeline.log.file import open_file_log


@pytest.fixture
def organism(tmp_path: Path) -> Organism:
    handlers.reset()
    return load_organism(write_organism(tmp_path / "org", ORGANISM,
                                        schemas={"item.xsd": ITEM_XSD}))


async def _sse_until(http: httpx.AsyncClient, params: dict[str, Any], last_type: str
                     ) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with http.stream("GET", "/events", params=params) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line[5:]))
                if seen[-1]["type"] == last_type:
                    break
    return seen


async def test_inject_watch_the_conversation_and_read_it_back(organism: Organism,
                                                             tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        answer = await http.post("/inject", json={"to": "first", "payload": {"n": "5"}})
        assert answer.status_code == 202, answer.text
        ids = answer.json()
        assert set(ids) == {"thread_id", "message_id"}
        events = await _sse_until(http, {"after": 0, "thread": ids["thread_id"]},
                                  "ThreadCompleted")
        assert [e["type"] for e in events if e["type"] == "MessageAccepted"] == [
            "MessageAccepted"] * 3
        assert [e["data"]["to"] for e in events if e["type"] == "MessageAccepted"] == [
            "first", "second", "third"]
        thread = (await http.get(f"/threads/{ids['thread_id']}")).json()
        assert (thread["status"], thread["message_count"]) == ("completed", 3)
        listed = (await http.get(f"/threads/{ids['thread_id']}/messages")).json()
        assert listed["count"] == listed["total"] == 3
        first, second, third = listed["messages"]
        assert first["message_id"] == ids["message_id"]
        assert (second["parent_id"], third["parent_id"]) == (first["message_id"],
                                                             second["message_id"])
        assert "<n>5</n>" in third["envelope"]
        threads = (await http.get("/threads", params={"status": "completed"})).json()
        assert [t["thread_id"] for t in threads["threads"]] == [ids["thread_id"]]
        assert set(threads) == {"threads", "count", "total", "offset", "limit"}


async def test_pause_and_resume_are_observed_through_delivery(organism: Organism,
                                                              tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        paused = await http.post("/agents/third/pause")
        assert paused.json() == {"success": True, "agent": "third", "state": "paused"}
        for k in range(5):
            r = await http.post("/inject",
                                json={"to": "third", "payload": f"<Item><n>{k}</n></Item>"})
            assert r.status_code == 202
        state = (await http.get("/organism/state")).json()  # waits until idle
        assert state["idle"] is True
        agent = (await http.get("/agents/third")).json()
        assert (agent["state"], agent["queued"], agent["delivered"]) == ("paused", 5, 0)
        assert handlers.seen == []
        resumed = await http.post("/agents/third/resume")
        assert resumed.json() == {"success": True, "agent": "third", "state": "running"}
        await http.get("/organism/state")
        assert [s["n"] for s in handlers.seen] == ["0", "1", "2", "3", "4"]


async def test_kill_cancels_the_handler_and_closes_the_thread(organism: Organism,
                                                              tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        ids = (await http.post("/inject", json={"to": "slow", "payload": "<Item><n>1</n></Item>"}
                               )).json()
        await _sse_until(http, {"after": 0, "type": "MessageDelivered"}, "MessageDelivered")
        killed = await http.post(f"/threads/{ids['thread_id']}/kill")
        assert killed.json() == {"success": True, "thread_id": ids["thread_id"]}
        handlers.gate.set()
        await http.get("/organism/state")
        assert not [s for s in handlers.seen if s["listener"] == "third"]
        assert (await http.get(f"/threads/{ids['thread_id']}")).json()["status"] == "killed"
        again = await http.post("/inject", json={"to": "third", "payload": "<Item><n>2</n></Item>",
                                                 "thread_id": ids["thread_id"]})
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "thread_closed"
        assert (await http.post("/threads/nope/kill")).status_code == 404


async def test_restart_gives_the_same_answers(organism: Organism, tmp_path: Path) -> None:
    data = tmp_path / "events"
    async with running_server(organism, data) as (base, _), client(base) as http:
        for k in range(3):
            await http.post("/inject", json={"to": "first", "payload": {"n": str(k)}})
        await http.post("/inject", json={"to": "failing", "payload": "<Item><n>x</n></Item>"})
        before = {path: (await http.get(path)).json()  # /organism/state first: it waits idle
                  for path in ("/organism/state", "/threads", "/usage", "/usage/threads",
                               "/dead-letters")}
    async with running_server(organism, data) as (base, _), client(base) as http:
        after = {path: (await http.get(path)).json()
                 for path in ("/threads", "/usage", "/usage/threads", "/dead-letters")}
        state = (await http.get("/organism/state")).json()
    for path in after:
        assert after[path] == before[path], path
    assert state["position"] > before["/organism/state"]["position"]  # Stopped/Started


XML = {"Content-Type": "application/xml"}
ENVELOPE = ('<message xmlns="urn:xml-pipeline:envelope:v1"><meta><to>{to}</to></meta>'
            '<Item xmlns=""><n>1</n></Item></message>')
BAD_INPUTS = [
    ("unknown listener", {"json": {"to": "nobody", "payload": "<Item><n>1</n></Item>"}},
     404, "unknown_listener", "There is no listener 'nobody' in organism 'pump-test'."),
    ("invalid payload", {"json": {"to": "third", "payload": "<Item><m>1</m></Item>"}},
     422, "invalid_payload", "The payload does not match item.xsd"),
    ("malformed xml", {"content": b"<Item><n>1</Item>", "params": {"to": "third"},
                       "headers": {"Content-Type": "application/xml"}},
     400, "malformed_xml", "The document is not well-formed XML"),
    ("hostile xml", {"content": b'<!DOCTYPE x [<!ENTITY a "b">]><Item><n>&a;</n></Item>',
                     "params": {"to": "third"}, "headers": {"Content-Type": "application/xml"}},
     400, "forbidden_xml", "The document has a DOCTYPE declaration"),
    ("oversized", {"content": b"<Item><n>" + b"x" * 2_000_000 + b"</n></Item>",
                   "params": {"to": "third"}, "headers": {"Content-Type": "application/xml"}},
     413, "xml_too_large", "The request body is 2000020 bytes, over the limit of 1048576"),
    ("wrong content type", {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
     415, "unsupported_media_type", "Content-Type 'text/plain' is not accepted"),
    ("bad json", {"content": b"{nope", "headers": {"Content-Type": "application/json"}},
     400, "invalid_json", "The body is not valid JSON"),
    ("json without payload", {"json": {"to": "third"}},
     400, "invalid_request", "The JSON body is not valid: 'payload' (XML text or an object)"),
    ("dict that does not fit", {"json": {"to": "third", "payload": {"m": 1}}},
     422, "invalid_payload", "The dict does not fit <Item> (item.xsd)"),
    # 300 kB of JSON that is 1.2 MB as XML: the cap is on the payload, whatever its form.
    ("dict over the cap", {"json": {"to": "third", "payload": {"n": "<" * 300_000}}},
     413, "xml_too_large", "The payload <Item> is 1200026 bytes as XML, over the limit of "
                           "1048576 bytes; send a smaller payload or raise limits.max_bytes in "
                           "organism.yaml."),
    *[(f"envelope to {name}", {"content": ENVELOPE.format(to=name).encode(), "headers": XML},
       404, "unknown_listener", f"There is no listener {name!r} in organism 'pump-test'.")
      for name in ("api", "cli", "system")],
    ("payload to api", {"content": b"<Item><n>1</n></Item>", "params": {"to": "api"},
                        "headers": XML},
     404, "unknown_listener", "There is no listener 'api' in organism 'pump-test'."),
]


@pytest.mark.parametrize("name,request_kwargs,status,code,message", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_gets_its_status_and_is_recorded(
        organism: Organism, tmp_path: Path, name: str, request_kwargs: dict[str, Any],
        status: int, code: str, message: str) -> None:
    data = tmp_path / "events"
    async with running_server(organism, data) as (base, _), client(base) as http:
        response = await http.post("/inject", **request_kwargs)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert error["message"].startswith(message), error["message"]
        assert error["request_id"] == response.headers["x-request-id"]
    log = await open_file_log(data, readonly=True)
    rejected = [r.event async for r in log.read() if isinstance(r.event, MessageRejected)]
    await log.aclose()
    assert [r.reason for r in rejected] == [code]
    assert rejected[0].sender == "api"
    assert len(rejected[0].raw) <= 4096


WRITE_ROUTES = ["/inject", "/agents/third/pause", "/agents/third/resume", "/threads/x/kill",
                "/organism/reload", "/organism/stop", "/usage/reset", "/dead-letters/x/retry"]


async def test_a_token_guards_every_route_and_is_read_from_the_header_only(
        organism: Organism, tmp_path: Path) -> None:
    token = "s3cret-token-for-tests"
    async with running_server(organism, tmp_path / "events", token=token) as (base, stop):
        async with client(base) as anonymous, client(base, "wrong") as wrong, \
                client(base, token) as good:
            for route in WRITE_ROUTES:
                for http in (anonymous, wrong):
                    response = await http.post(route, json={})
                    assert response.status_code == 401, route
                    assert response.json()["error"]["code"] == "unauthorized"
                    assert response.headers["www-authenticate"].startswith("Bearer")
            for route in ("/threads", "/agents", "/usage", "/openapi.json"):
                assert (await anonymous.get(route)).status_code == 401
            # Anywhere but the Authorization header, the token is not a credential.
            for params in ({"token": token}, {"access_token": token}, {"api_key": token}):
                assert (await anonymous.get("/threads", params=params)).status_code == 401
            cookie = await anonymous.get("/threads", headers={"Cookie": f"token={token}"})
            assert cookie.status_code == 401
            assert (await good.get("/threads")).status_code == 200
            assert stop.is_set() is False
        async with httpx.AsyncClient(base_url=base) as plain:
            assert (await plain.get("/health")).status_code == 200
            assert (await plain.get("/metrics")).status_code == 401


def test_refuses_a_public_address_without_a_token(organism: Organism, tmp_path: Path) -> None:
    with pytest.raises(UnsafeBindError) as info:
        config(organism, host="0.0.0.0", port=8765, data=tmp_path, token=None, access_log=False)
    assert str(info.value).startswith("Refusing to listen on 0.0.0.0")
    assert config(organism, host="0.0.0.0", port=8765, data=tmp_path, token="t",
                  access_log=False) is not None


async def test_read_endpoints_and_metrics(organism: Organism, tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        await http.post("/inject", json={"to": "first", "payload": {"n": "1"}})
        await http.post("/inject", json={"to": "failing", "payload": "<Item><n>1</n></Item>"})
        await http.get("/organism/state")
        org = (await http.get("/organism")).json()
        assert (org["name"], org["status"], org["listeners"]) == ("pump-test", "running", 12)
        assert "listeners:" in (await http.get("/organism/config")).json()["source"]
        caps = (await http.get("/capabilities", params={"limit": 2})).json()
        assert (caps["count"], caps["total"], caps["limit"]) == (2, 12, 2)
        cap = (await http.get("/capabilities/first")).json()
        assert cap["example"].startswith("<Item>") and "<xs:schema" in cap["schema"]
        schema = await http.get("/agents/first/schema")
        assert schema.headers["content-type"].startswith("application/xml")
        assert (await http.get("/agents/first/config")).json()["peers"] == ["second"]
        agents = (await http.get("/agents")).json()
        assert {a["name"]: a["succeeded"] for a in agents["agents"]}["third"] == 1
        dead = (await http.get("/dead-letters")).json()
        assert dead["count"] == 1 and dead["dead_letters"][0]["listener"] == "failing"
        retried = await http.post(f"/dead-letters/{dead['dead_letters'][0]['message_id']}/retry")
        assert retried.json()["success"] is True
        await http.get("/organism/state")
        assert (await http.get("/dead-letters")).json()["count"] == 1  # failed again
        messages = (await http.get("/messages", params={"limit": 2})).json()
        assert messages["count"] == 2 and messages["total"] == 4
        usage = (await http.get("/usage")).json()["usage"]
        assert set(usage["totals"]) == {"total_tokens", "prompt_tokens", "completion_tokens",
                                        "request_count", "total_cost", "avg_latency_ms"}
        assert (await http.post("/usage/reset")).json() == {"success": True}
        assert (await http.get("/agents/nope")).status_code == 404
        assert (await http.get("/threads", params={"limit": 0})).status_code == 400
        assert (await http.get("/nope")).json()["error"]["code"] == "not_found"
        metrics = (await http.get(base + "/metrics")).text
        assert 'xml_pipeline_messages_accepted_total{listener="third"} 1' in metrics
        assert 'xml_pipeline_handler_seconds_count{listener="first"} 1' in metrics
        assert "xml_pipeline_log_fsyncs_total" in metrics
        spec = (await http.get("/openapi.json")).json()
        assert "/inject" in spec["paths"] and "/threads/{thread_id}/messages" in spec["paths"]
        assert "post" in spec["paths"]["/agents/{name}/pause"]


async def test_the_total_of_messages_honours_the_filters(organism: Organism,
                                                         tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        for k in range(3):
            await http.post("/inject", json={"to": "third", "payload": {"n": str(k)}})
        await http.post("/inject", json={"to": "first", "payload": {"n": "3"}})
        await http.get("/organism/state")  # waits until idle: first -> second -> third
        everything = (await http.get("/messages", params={"limit": 1000})).json()["messages"]
        assert len(everything) == 6

        def matching(agent: str | None, after: int) -> list[dict[str, Any]]:
            return [m for m in everything if m["position"] > after
                    and (agent is None or agent in (m["sender"], m["to"]))]

        middle = everything[2]["position"]
        for agent, after in (("third", 0), ("first", 0), ("nobody", 0), (None, middle),
                             ("third", middle)):
            params: dict[str, Any] = {"limit": 1, "after": after}
            if agent is not None:
                params["agent"] = agent
            answer = (await http.get("/messages", params=params)).json()
            expected = matching(agent, after)
            assert answer["total"] == len(expected), (agent, after)
            assert [m["message_id"] for m in answer["messages"]] == [
                m["message_id"] for m in expected[:1]]
        assert (await http.get("/messages", params={"limit": 1})).json()["total"] == 6

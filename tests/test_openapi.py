"""The served OpenAPI document against the code it describes and the clients made from it.

The document is the endpoints' own docstrings (``xml_pipeline/api/openapi.py``); these tests
keep it honest: it is valid OpenAPI 3, ``openapi-python-client`` makes a working client of it
without a warning, every route is in it with its methods, every operation has a name and a
summary, reads exactly the query parameters it declares, and answers every status it declares
to a real request (while ``tests/test_api_fuzz.py`` checks that it answers no other).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from starlette.datastructures import QueryParams
from starlette.requests import HTTPConnection
from starlette.routing import Mount, Route, WebSocketRoute

from tests import handlers
from tests.api_server import client, running_server
from tests.conftest import write_organism
from tests.test_pump import ITEM_XSD, ORGANISM
from xml_pipeline.api import app as api_app
from xml_pipeline.api.app import create_app
from xml_pipeline.api.openapi import GUARDS, OPERATION_IDS, document
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.runtime.pump import open_pump

TOKEN = "openapi-token"
#: Served under /api/v1 but not operations of the document: the document itself, and the
#: WebSocket (OpenAPI 3.0 cannot describe one; docs/api.md does).
NOT_OPERATIONS = {"/openapi.json", "/ws"}
#: What openapi-python-client is told: XML and the event stream are bytes to it.
GENERATOR_CONFIG = {"post_hooks": [], "content_type_overrides": {
    "application/xml": "application/octet-stream", "text/xml": "application/octet-stream",
    "text/event-stream": "application/octet-stream"}}


AGENT = """  - {name: planner, description: d, payload: schemas/item.xsd,
     agent: {model: claude-haiku-4-5, system: You plan., max_tokens: 1000}}
"""  # never called: it is there to have a budget of its own


@pytest.fixture
def organism(tmp_path: Path) -> Organism:
    handlers.reset()
    return load_organism(write_organism(tmp_path / "org", ORGANISM + AGENT,
                                        schemas={"item.xsd": ITEM_XSD}))


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


async def served(organism: Organism, data: Path) -> dict[str, Any]:
    async with running_server(organism, data) as (base, _), client(base) as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


async def test_the_served_document_is_valid_openapi_3(organism: Organism,
                                                      tmp_path: Path) -> None:
    validate(await served(organism, tmp_path / "events"))


def test_every_operation_has_a_unique_name_and_a_summary(organism: Organism,
                                                         tmp_path: Path) -> None:
    spec = document(_api_routes(organism, tmp_path))
    labels = {f"{method} {path}": operation for method, path, operation in operations(spec)}
    names = [operation["operationId"] for operation in labels.values()]
    assert len(names) == len(set(names))
    # Each by the name OPERATION_IDS gives it, and no name there is for a route gone.
    assert {label: op["operationId"] for label, op in labels.items()} == OPERATION_IDS
    for label, operation in labels.items():
        assert operation["summary"] and len(operation["summary"]) <= 120, label
        assert "\n" not in operation["summary"], label
        assert operation["description"].startswith(operation["summary"]), label


def _api_routes(organism: Organism, tmp_path: Path) -> list[Any]:
    app = create_app(organism, data=tmp_path / "events")
    [mount] = [route for route in app.routes if isinstance(route, Mount)]
    assert mount.path == "/api/v1"
    return list(mount.routes)


def test_every_route_is_in_the_document_with_its_methods(organism: Organism,
                                                         tmp_path: Path) -> None:
    routes = _api_routes(organism, tmp_path)
    served_ops: set[str] = set()
    for route in routes:
        assert isinstance(route, Route | WebSocketRoute), route
        if route.path in NOT_OPERATIONS:
            continue
        assert isinstance(route, Route) and route.methods, route.path
        served_ops |= {f"{method} {route.path}" for method in route.methods - {"HEAD"}}
    spec = document(routes)
    assert {f"{method} {path}" for method, path, _ in operations(spec)} == served_ops


def test_every_enum_is_a_named_schema_of_its_own() -> None:
    # Inline enums are what made two generated types named AgentState.
    spec = document(api_app._api_routes())
    schemas = spec["components"]["schemas"]
    named = {name for name, schema in schemas.items() if "enum" in schema}
    assert {"AgentStatus", "ThreadStatus", "OrganismStatus", "ListenerKind"} <= named

    def inline(node: Any, where: str) -> Iterator[str]:
        if isinstance(node, dict):
            if "enum" in node and node.get("type") != "boolean":
                yield where
            for key, value in node.items():
                yield from inline(value, f"{where}/{key}")
        elif isinstance(node, list):
            for n, value in enumerate(node):
                yield from inline(value, f"{where}/{n}")

    found = [w for name, schema in schemas.items() if name not in named
             for w in inline(schema, name)] + list(inline(spec["paths"], "paths"))
    assert found == []


# ------------------------------------------------------------------ a generated client


def _generate(spec: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    (folder / "openapi.json").write_text(json.dumps(spec))
    (folder / "config.json").write_text(json.dumps(GENERATOR_CONFIG))
    return subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path",
         str(folder / "openapi.json"), "--config", str(folder / "config.json"), "--meta",
         "none", "--output-path", str(folder / "xml_pipeline_client"), "--fail-on-warning"],
        capture_output=True, text=True, timeout=120, check=False)


def _use_client(base: str) -> None:
    """Call the server through the generated client, as its user would."""
    from xml_pipeline_client import Client
    from xml_pipeline_client.api.default import (
        get_agent,
        get_thread,
        inject,
        list_agents,
        pause_agent,
    )
    from xml_pipeline_client.models import Agents, AgentStatus, InjectJsonBody, ThreadStatus

    with Client(base_url=f"{base}/api/v1") as http:
        agents = list_agents.sync(client=http, limit=100)
        assert isinstance(agents, Agents)
        assert {a.name: a.state for a in agents.agents}["third"] is AgentStatus.RUNNING
        paused = pause_agent.sync("third", client=http)
        assert paused is not None and paused.state is AgentStatus.PAUSED
        third = get_agent.sync("third", client=http)
        assert third is not None and third.state is AgentStatus.PAUSED  # type: ignore[union-attr]
        ids = inject.sync(client=http, body=InjectJsonBody(to="first",
                                                          payload="<Item><n>1</n></Item>"))
        thread = get_thread.sync(ids.thread_id, client=http)  # type: ignore[union-attr]
        assert thread is not None
        assert thread.status in (ThreadStatus.ACTIVE, ThreadStatus.COMPLETED)  # type: ignore


async def test_openapi_python_client_generates_a_client_that_works(
        organism: Organism, tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http:
        spec = (await http.get("/openapi.json")).json()
        generated = await asyncio.to_thread(_generate, spec, tmp_path)
        assert generated.returncode == 0, generated.stdout + generated.stderr
        assert "Warning" not in generated.stdout, generated.stdout
        sys.path.insert(0, str(tmp_path))
        try:
            importlib.invalidate_caches()
            await asyncio.to_thread(_use_client, base)
        finally:
            sys.path.remove(str(tmp_path))
            for name in [n for n in sys.modules if n.split(".")[0] == "xml_pipeline_client"]:
                del sys.modules[name]


# ------------------------------------------------------------------ what each operation answers


async def _known(http: httpx.AsyncClient) -> dict[str, str]:
    """Real ids: a thread, a thread to kill, a dead letter and a killed thread's dead letter."""
    done = (await http.post("/inject", json={"to": "first", "payload": {"n": "1"}})).json()
    victim = (await http.post("/inject", json={"to": "third", "payload": {"n": "2"}})).json()
    failed = (await http.post("/inject", json={"to": "failing", "payload": {"n": "x"}})).json()
    closed = (await http.post("/inject", json={"to": "failing", "payload": {"n": "y"}})).json()
    await http.get("/organism/state")
    dead = {d["thread_id"]: d["message_id"]
            for d in (await http.get("/dead-letters")).json()["dead_letters"]}
    assert (await http.post(f"/threads/{closed['thread_id']}/kill")).status_code == 200
    return {"name": "third", "thread_id": done["thread_id"], "model": "model-x",
            "victim": victim["thread_id"], "message_id": dead[failed["thread_id"]],
            "closed": closed["thread_id"], "closed_letter": dead[closed["thread_id"]]}


def _url(path: str, known: dict[str, str], **override: str) -> str:
    values = known | override
    for name in ("name", "thread_id", "model", "message_id"):
        path = path.replace("{" + name + "}", values[name])
    return path


_XML = {"Content-Type": "application/xml"}


def _answers(known: dict[str, str], max_bytes: int) -> list[tuple[str, int, dict[str, Any]]]:
    """``(operation, status, request)``: one request for each status each operation declares,
    but for the guards' (tested for every operation at once) and 429 (its own test)."""
    ok: list[tuple[str, int, dict[str, Any]]] = [
        (f"GET {path}", 200, {}) for path in [
            "/organism", "/organism/config", "/organism/state", "/capabilities",
            "/capabilities/{name}", "/agents", "/agents/{name}", "/agents/{name}/config",
            "/agents/{name}/schema", "/threads", "/threads/{thread_id}",
            "/threads/{thread_id}/messages", "/messages", "/dead-letters", "/usage",
            "/usage/threads", "/usage/threads/{thread_id}", "/usage/agents/{name}",
            "/usage/models/{model}"]]
    bad_page = [(f"GET {path}", 400, {"params": {"limit": "0"}}) for path in [
        "/capabilities", "/agents", "/threads", "/threads/{thread_id}/messages", "/messages",
        "/dead-letters", "/usage/threads"]]
    no_such = [(f"{method} {path}", 404, {"url": _url(path, known, name="nobody",
                                                      thread_id="nothread",
                                                      message_id="noletter")})
               for method, path in [
                   ("GET", "/capabilities/{name}"), ("GET", "/agents/{name}"),
                   ("GET", "/agents/{name}/config"), ("GET", "/agents/{name}/schema"),
                   ("GET", "/threads/{thread_id}"), ("GET", "/threads/{thread_id}/messages"),
                   ("GET", "/usage/threads/{thread_id}"), ("GET", "/usage/agents/{name}"),
                   ("POST", "/agents/{name}/pause"), ("POST", "/agents/{name}/resume"),
                   ("POST", "/threads/{thread_id}/kill"),
                   ("POST", "/dead-letters/{message_id}/retry")]]
    budget = "POST /usage/threads/{thread_id}/budget"
    agent_budget = "POST /usage/agents/{name}/budget"
    organism_budget = "POST /usage/organism/budget"
    inject = "POST /inject"
    item = "<Item><n>1</n></Item>"
    return [*ok, *bad_page, *no_such,
            ("GET /events", 200, {"params": {"after": "0"}}),
            ("GET /events", 400, {"params": {"after": "nope"}}),
            (inject, 202, {"content": item, "headers": _XML, "params": {"to": "third"}}),
            (inject, 400, {"content": "<Item>", "headers": _XML, "params": {"to": "third"}}),
            (inject, 404, {"json": {"to": "nobody", "payload": item}}),
            (inject, 409, {"json": {"to": "third", "payload": item,
                                    "thread_id": known["closed"]}}),
            (inject, 413, {"content": "<Item><n>" + "x" * max_bytes + "</n></Item>",
                           "headers": _XML, "params": {"to": "third"}}),
            (inject, 415, {"content": item, "headers": {"Content-Type": "text/plain"}}),
            (inject, 422, {"json": {"to": "third", "payload": "<Nope/>"}}),
            ("POST /agents/{name}/pause", 200, {}),
            ("POST /agents/{name}/resume", 200, {}),
            ("POST /threads/{thread_id}/kill", 200, {"url": f"/threads/{known['victim']}/kill"}),
            ("POST /dead-letters/{message_id}/retry", 200, {}),
            ("POST /dead-letters/{message_id}/retry", 409,
             {"url": f"/dead-letters/{known['closed_letter']}/retry"}),
            (budget, 200, {"json": {"max_tokens": 100}}),
            (budget, 400, {"json": {"max_tokens": 0}}),
            (budget, 404, {"json": {"max_tokens": 100}, "url": _url(
                "/usage/threads/{thread_id}/budget", known, thread_id="nothread")}),
            (budget, 413, {"json": {"max_tokens": 100, "pad": "x" * max_bytes}}),
            (budget, 415, {"content": '{"max_tokens": 100}',
                           "headers": {"Content-Type": "text/plain"}}),
            *[(label, status, request | {"url": url}) for label, url in [
                (agent_budget, "/usage/agents/planner/budget"),
                (organism_budget, "/usage/organism/budget")]
              for status, request in [
                  (200, {"json": {"max_tokens": 100}}),
                  (400, {"json": {"max_tokens": -1}}),
                  (415, {"content": '{"max_tokens": 100}',
                         "headers": {"Content-Type": "text/plain"}})]],
            (agent_budget, 404, {"json": {"max_tokens": 100},
                                 "url": "/usage/agents/nobody/budget"}),
            ("POST /usage/reset", 200, {}),
            ("POST /organism/reload", 200, {}),
            ("POST /organism/reload", 422, {"bad_organism": True}),
            ("POST /organism/stop", 202, {}),  # last: the server exits
            ]


def _guarded(operation: dict[str, Any]) -> set[str]:
    """The statuses of ``operation`` that only the guards (``GUARDS``) answer."""
    return {status for status, name, _ in GUARDS
            if operation["responses"].get(status) == {"$ref": f"#/components/responses/{name}"}}


async def _call(http: httpx.AsyncClient, label: str, request: dict[str, Any],
                known: dict[str, str]) -> httpx.Response:
    method, path = label.split(" ", 1)
    request = dict(request)
    url = request.pop("url", None) or _url(path, known)
    if path == "/events":
        async with http.stream(method, url, **request) as response:
            return response  # the status and headers are enough; the stream never ends
    return await http.request(method, url, **request)


async def test_every_operation_answers_each_status_it_declares(
        organism: Organism, tmp_path: Path) -> None:
    spec = await served(organism, tmp_path / "first")
    responses = {f"{method} {path}": set(operation["responses"])
                 for method, path, operation in operations(spec)}
    # The endpoint's own answers, not the guards' (nor 429: a test of its own).
    own = {f"{method} {path}": set(operation["responses"]) - _guarded(operation) - {"429"}
           for method, path, operation in operations(spec)}
    seen: dict[str, set[str]] = {label: set() for label in responses}
    async with running_server(organism, tmp_path / "events") as (base, stop), \
            client(base) as http:
        known = await _known(http)
        for label, status, request in _answers(known, organism.limits.max_bytes):
            if request.pop("bad_organism", False):
                assert organism.path is not None
                organism.path.write_text("listeners: [\n")
            response = await _call(http, label, request, known)
            assert response.status_code == status, (label, request, response.text)
            assert str(status) in responses[label], (label, status)
            seen[label].add(str(status))
        assert stop.is_set()
    # Nothing declared that no request brings about.
    assert {label: statuses - seen[label] for label, statuses in own.items()
            if statuses - seen[label]} == {}


async def test_a_full_mailbox_is_the_429_inject_declares(
        organism: Organism, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_app, "open_pump", partial(open_pump, mailbox_capacity=1))
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http:
        spec = (await http.get("/openapi.json")).json()
        assert "429" in spec["paths"]["/inject"]["post"]["responses"]
        await http.post("/agents/third/pause")
        answers = [(await http.post("/inject", json={"to": "third", "payload": {"n": "1"}}))
                   .status_code for _ in range(2)]
        assert answers == [202, 429]
        await http.post("/agents/third/resume")


async def _raw_status(base: str, method: str, path: str, headers: dict[str, str]) -> int:
    """The status of a request sent by hand (a Content-Length no client library would send
    without its body)."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        lines = [f"{method} /api/v1{path} HTTP/1.1", f"Host: {host}",
                 *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        writer.write("\r\n".join(lines).encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)  # a hang fails, not waits
        return int(status_line.split()[1])
    finally:
        writer.close()


async def test_every_operation_answers_what_its_guards_declare(
        organism: Organism, tmp_path: Path) -> None:
    spec = await served(organism, tmp_path / "first")
    known = FAKE_IDS
    ops = [(method, _url(path, known), op) for method, path, op in operations(spec)
           if method != "POST" or path != "/organism/stop"]
    for _, path, op in operations(spec):
        assert {"401", "403", "413"} <= set(op["responses"])
        assert ("404" in op["responses"]) >= ("{" in path)
    async with running_server(organism, tmp_path / "token", token=TOKEN) as (base, _), \
            client(base) as anonymous:
        for method, url, _ in ops:
            assert (await anonymous.request(method, url)).status_code == 401, url
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http:
        for method, url, _ in ops:
            elsewhere = {"Origin": "http://evil.example"}
            if url == "/events":
                async with http.stream(method, url, headers=elsewhere) as response:
                    assert response.status_code == 403
            else:
                assert (await http.request(method, url, headers=elsewhere)
                        ).status_code == 403, url
            huge = {"Content-Length": str(10 * organism.limits.max_bytes)}
            assert await _raw_status(base, method, url, huge) == 413, url
        for method, path, _ in operations(spec):
            if "{" in path:  # a line break in a path parameter matches no route
                response = await http.request(method, _url(path, {
                    name: "a%0Ab" for name in ("name", "thread_id", "model", "message_id")}))
                assert (response.status_code, response.json()["error"]["code"]) == (
                    404, "not_found"), path


#: path parameters no route's data has: enough for a guard to answer first
FAKE_IDS = {"name": "third", "thread_id": "t", "model": "m", "message_id": "m"}


def with_api(tmp_path: Path, settings: str) -> Organism:
    """The test organism with ``settings`` in its ``api`` section."""
    handlers.reset()
    return load_organism(write_organism(tmp_path / "org", ORGANISM.replace(
        "organism: {name: pump-test}", f"organism: {{name: pump-test, api: {{{settings}}}}}"),
        schemas={"item.xsd": ITEM_XSD}))


async def test_every_counted_operation_answers_503_while_the_server_is_full(
        tmp_path: Path) -> None:
    organism = with_api(tmp_path, "max_requests: 1")
    spec = await served(organism, tmp_path / "first")
    known = FAKE_IDS
    async with running_server(organism, tmp_path / "events") as (base, stop), \
            client(base) as http, client(base) as holder:
        assert (await http.post("/inject", json={"to": "slow", "payload": {"n": "1"}})
                ).status_code == 202
        # GET /organism/state waits for the slow handler, which waits for the gate: it holds
        # the one request slot until the gate opens.
        held = asyncio.ensure_future(holder.get("/organism/state"))
        for _ in range(1000):
            if (await http.get("/agents")).status_code == 503:
                break
        else:
            raise AssertionError("the held request never filled the server")
        for method, path, operation in operations(spec):
            counted = "503" in operation["responses"]
            assert counted == (path != "/events"), path
            if counted:
                response = await http.request(method, _url(path, known))
                assert response.status_code == 503, path
                assert response.json()["error"]["code"] == "busy"
        assert not stop.is_set()  # POST /organism/stop was refused too
        handlers.gate.set()
        assert (await held).status_code == 200


async def test_every_counted_operation_answers_408_to_a_body_that_does_not_arrive(
        tmp_path: Path) -> None:
    organism = with_api(tmp_path, "body_timeout: 50ms")
    spec = await served(organism, tmp_path / "first")
    known = FAKE_IDS
    async with running_server(organism, tmp_path / "events") as (base, stop):
        for method, path, operation in operations(spec):
            timed = "408" in operation["responses"]
            assert timed == (path != "/events"), path
            if timed:  # ten bytes announced, none sent
                assert await _raw_status(base, method, _url(path, known),
                                         {"Content-Length": "10"}) == 408, path
        assert not stop.is_set()  # POST /organism/stop was refused too


class _Recording(QueryParams):
    """Query parameters that note each name an endpoint asks for."""

    asked: set[str] = set()

    def __getitem__(self, key: Any) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.asked.add(key)
        return super().__contains__(key)

    def getlist(self, key: Any) -> list[str]:
        self.asked.add(key)
        return super().getlist(key)


async def test_every_operation_reads_exactly_the_query_parameters_it_declares(
        organism: Organism, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = await served(organism, tmp_path / "first")
    monkeypatch.setattr(HTTPConnection, "query_params",
                        property(lambda conn: _Recording(conn.scope["query_string"])))
    async with running_server(organism, tmp_path / "events") as (base, _), \
            client(base) as http:
        known = await _known(http)
        for label, status, request in _answers(known, organism.limits.max_bytes):
            if status >= 300 or label == "POST /organism/stop":
                continue
            method, path = label.split(" ", 1)
            _Recording.asked.clear()
            assert (await _call(http, label, request, known)).status_code == status
            operation = spec["paths"][path][method.lower()]
            declared = {p["name"] for p in operation.get("parameters", [])
                        if "$ref" not in p and p["in"] == "query"}
            declared |= {spec["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]]["name"]
                         for p in operation.get("parameters", []) if "$ref" in p
                         and spec["components"]["parameters"][p["$ref"].rsplit("/", 1)[1]][
                             "in"] == "query"}
            assert _Recording.asked == declared, label

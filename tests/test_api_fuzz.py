"""Fuzzing the HTTP API on a real server, against its own OpenAPI document.

Schemathesis generates valid and invalid requests for every documented operation (with real
listener names, thread ids and dead letters as well as random ones) and checks each answer
against the document: never a 5xx, only documented statuses, the documented content types,
headers and body shapes (every 4xx is ``{"error": {code, message, details, request_id}}``).
Hypothesis throws raw bodies at ``POST /inject`` (random bytes, XML-ish text, JSON) and random
queries at ``GET /events``. The fuzzers run in a worker thread with blocking clients while the
server runs in the test's event loop; they are seeded (``derandomize``) and bounded.

The nastiest inputs they found are kept at the end as plain regression tests.
"""

from __future__ import annotations

import asyncio
import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests import handlers
from tests.api_server import client, running_server
from tests.conftest import write_organism
from tests.test_pump import ITEM_XSD, ORGANISM
from xml_pipeline.api.app import create_app
from xml_pipeline.api.responses import STATUS_BY_CODE
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.envelope import ENVELOPE_NS
from xml_pipeline.events import MessageRejected
from xml_pipeline.log.file import open_file_log

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: Examples per operation and generation mode; the whole schemathesis run takes a few seconds.
MAX_EXAMPLES = 25
#: Raw bodies for POST /inject (a few milliseconds each).
RAW_EXAMPLES = 400
#: Operations left out of the schemathesis run: stopping ends the server (it gets one plain
#: call at the end), and the event stream never ends (``test_event_stream_queries`` covers it).
NOT_FUZZED = {"POST /organism/stop", "GET /events"}
#: Listeners whose handlers finish on their own (``slow`` waits for a gate, ``sleepy`` an hour).
QUICK_LISTENERS = ["first", "second", "third", "caller", "echo", "failing", "flaky"]

INJECT_STATUSES = {202, 400, 404, 409, 413, 415, 422, 429}

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          positive_data_acceptance]
#: A valid JSON body may still name no listener or carry text that is not XML; the schema
#: cannot say which listeners exist, so valid-by-schema inject bodies may be refused.
INJECT_CHECKS = [check for check in CHECKS if check is not positive_data_acceptance]

SETTINGS = settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.fixture
def organism(tmp_path: Path) -> Organism:
    handlers.reset()
    return load_organism(write_organism(tmp_path / "org", ORGANISM,
                                        schemas={"item.xsd": ITEM_XSD}))


async def _seed(http: httpx.AsyncClient) -> dict[str, list[str]]:
    """Real values for path parameters: a completed thread, a failed one and its dead letter."""
    done = (await http.post("/inject", json={"to": "first", "payload": {"n": "1"}})).json()
    failed = (await http.post("/inject", json={"to": "failing",
                                               "payload": "<Item><n>x</n></Item>"})).json()
    await http.get("/organism/state")  # waits until idle
    dead = (await http.get("/dead-letters")).json()["dead_letters"]
    return {"name": ["third", "failing"], "thread_id": [done["thread_id"], failed["thread_id"]],
            "message_id": [d["message_id"] for d in dead], "model": ["no-such-model"]}


def _run(strategy: st.SearchStrategy[Any], test: Callable[[Any], None], *,
         max_examples: int = MAX_EXAMPLES) -> None:
    settings(SETTINGS, max_examples=max_examples)(given(strategy)(test))()


def _schemathesis_fuzz(base: str, known: dict[str, list[str]]) -> tuple[list[str], set[str]]:
    """Fuzz every operation; answer the failures (one text each) and the statuses seen."""
    config = schemathesis.Config.from_dict({
        "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
        # Leaving the token out is tested once per operation, not in every other negative case.
        "generation": {"with-security-parameters": False},
    })
    schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json", config=config,
                                           headers=AUTH)
    schema.validate()
    failures: list[str] = []
    seen: set[str] = set()
    with requests.Session() as session:
        operations = [result.ok() for result in schema.get_all_operations()]
        # Reads first, and killing threads last (a dead letter of a killed thread is not retried).
        operations.sort(key=lambda op: (op.method != "get", op.path.endswith("/kill")))
        for operation in operations:
            if operation.label in NOT_FUZZED:
                continue

            def call(case: Any) -> None:
                response = case.call_and_validate(base_url=f"{base}/api/v1", session=session,
                                                  checks=INJECT_CHECKS if case.operation.path
                                                  == "/inject" else CHECKS)
                seen.add(f"{case.operation.label} {response.status_code}")

            strategies: list[st.SearchStrategy[Any]] = [
                *operation.get_strategies_from_examples(),
                *(operation.as_strategy(media_type=media_type)
                  for media_type in operation.get_request_payload_content_types() or [None]),
            ]
            path_names = [p.name for p in operation.path_parameters]
            for name in path_names:  # the real ones as well as random ones
                fixed = {other: known[other][0] for other in path_names}
                strategies += [operation.as_strategy(path_parameters={**fixed, name: value})
                               for value in known[name]]
            # Only query parameters and bodies have values that break the document's rules
            # (any text is a valid path segment or header).
            if list(operation.query) or operation.body:
                strategies += [operation.as_strategy(GenerationMode.NEGATIVE, media_type=media)
                               for media in operation.get_request_payload_content_types()
                               or [None]]
            for strategy in strategies:
                try:
                    _run(strategy, call)
                except (Exception, FailureGroup) as exc:  # every failure, not only the first
                    failures.append(f"{operation.label}: {exc}")
    return failures, seen


async def test_every_operation_answers_as_its_openapi_document_says(organism: Organism,
                                                                    tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events", token=TOKEN) as (base, stop), \
            client(base, TOKEN) as http:
        known = await _seed(http)
        failures, seen = await asyncio.to_thread(_schemathesis_fuzz, base, known)
        assert not failures, "\n\n".join(failures)
        # The fuzz reached the answers that matter, not only refusals.
        for answer in ("GET /threads/{thread_id} 200", "GET /threads/{thread_id} 404",
                       "GET /agents/{name}/schema 200", "GET /threads 400",
                       "POST /dead-letters/{message_id}/retry 200", "POST /inject 400",
                       "POST /inject 404", "POST /threads/{thread_id}/kill 200"):
            assert answer in seen
        # Stopping, once, at the end: 202, and the server is asked to exit.
        stopped = await http.post("/organism/stop")
        assert (stopped.status_code, stopped.json()) == (202, {"success": True})
        assert stop.is_set()


async def test_every_operation_refuses_a_missing_or_wrong_token(organism: Organism,
                                                                tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events", token=TOKEN) as (base, stop), \
            client(base, TOKEN) as good, client(base) as anonymous, \
            client(base, "wrong") as wrong:
        spec = (await good.get("/openapi.json")).json()
        for path, operations in spec["paths"].items():
            url = path.replace("{", "").replace("}", "")
            for method, operation in operations.items():
                assert "401" in operation["responses"], f"{method} {path}"
                for http in (anonymous, wrong):
                    response = await http.request(method.upper(), url)
                    assert response.status_code == 401, f"{method} {path}"
                    _assert_error_shape(response)
        assert not stop.is_set()


# ------------------------------------------------------------------ raw bodies for POST /inject

_TAGS = ["Item", "n", "m", "message", "meta", "to", "from", "thread", "id", "parent", "sent",
         "x:Item", "a", "\u00e9l\u00e9ment"]
_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
_NAMES = st.sampled_from([*QUICK_LISTENERS, "nobody", "", " third", "Third", "th\u0000ird",
                          "a" * 300, "../third", "%74hird"])


@st.composite
def _xmlish(draw: st.DrawFn, depth: int = 0) -> str:
    """Text that is often almost XML: real tags, entities, CDATA, DOCTYPEs, envelopes."""
    pieces = [draw(_TEXT)]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["element", "text", "entity", "cdata", "comment", "pi",
                                     "broken", "doctype", "envelope", "attribute"]))
        tag = draw(st.sampled_from(_TAGS))
        if kind == "element" and depth < 4:
            pieces.append(f"<{tag}>{draw(_xmlish(depth + 1))}</{tag}>")
        elif kind == "entity":
            pieces.append(draw(st.sampled_from(["&amp;", "&lt;", "&#0;", "&#x1F600;", "&a;",
                                                "&#xD800;", "&", "&#99999999;"])))
        elif kind == "cdata":
            pieces.append(f"<![CDATA[{draw(_TEXT)}]]>")
        elif kind == "comment":
            pieces.append(f"<!--{draw(_TEXT)}-->")
        elif kind == "pi":
            pieces.append(draw(st.sampled_from(['<?xml version="1.0"?>', "<?php x ?>",
                                                '<?xml version="1.0" encoding="utf-16"?>',
                                                '<?xml-stylesheet href="x"?>'])))
        elif kind == "broken":
            pieces.append(draw(st.sampled_from(["<", ">", "</", "<Item", "</Item>", "<>",
                                                "<Item/><Item/>", "<n></m>", "\x00", "\ufeff"])))
        elif kind == "doctype":
            pieces.append('<!DOCTYPE x [<!ENTITY a "b">]>')
        elif kind == "envelope":
            to = draw(_NAMES)
            pieces.append(f'<message xmlns="{ENVELOPE_NS}"><meta><to>{to}</to>'
                          f"{draw(st.sampled_from(['', '<thread>t-1</thread>', '<id>x</id>']))}"
                          f"</meta>{draw(_xmlish(depth + 1))}</message>")
        elif kind == "attribute":
            pieces.append(f'<{tag} xmlns="{draw(_TEXT)}" a="{draw(_TEXT)}"/>')
        else:
            pieces.append(draw(_TEXT))
    return "".join(pieces)


#: Any code point, lone surrogates too: JSON can carry them as escapes ("\\ud800").
_ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=12)
_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | _ANY_TEXT
_JSON_VALUES = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(_ANY_TEXT, inner, max_size=3), max_leaves=8)
_PAYLOADS = (_xmlish() | st.just("<Item><n>1</n></Item>") | _JSON_VALUES
             | st.dictionaries(st.sampled_from(["n", "m", "", "1", "n n", "@n", "#text"])
                               | _ANY_TEXT, _JSON_VALUES, max_size=3))


@st.composite
def _json_body(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {}
    texts = st.none() | _ANY_TEXT | _JSON_VALUES
    for key, value in [("to", _NAMES | _JSON_VALUES), ("payload", _PAYLOADS),
                       ("thread_id", texts), ("idempotency_key", texts), ("extra", _JSON_VALUES)]:
        if draw(st.integers(0, 9)) < (8 if key in ("to", "payload") else 2):
            body[key] = draw(value)
    depth = draw(st.sampled_from([1, 1, 1, 50, 5000, 100_000]))
    if depth > 1:  # deeper than anything sane, the parser's recursion limit included
        nested = '{"n": ' * depth + "1" + "}" * depth
        text = draw(st.sampled_from([f'{{"to": "third", "payload": {nested}}}', "[" * depth]))
    else:
        data = draw(st.sampled_from([body, body, body, draw(_JSON_VALUES)]))
        text = json.dumps(data)  # NaN and Infinity too, which strict parsers refuse
    return draw(st.sampled_from([text.encode(), text.encode("utf-16"),
                                 text.encode()[:max(1, len(text) // 2)]]))


_CONTENT_TYPES = st.sampled_from([
    "application/json", "application/xml", "text/xml", "application/xml; charset=utf-8",
    "APPLICATION/JSON", "text/plain", "", "multipart/form-data; boundary=x", ";", "xml",
    "application/json; charset=utf-16"])


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;")


@st.composite
def _nearly_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A message that is right but for one odd field: the ids, keys and texts the bus takes."""
    to = draw(st.sampled_from(QUICK_LISTENERS))
    text = draw(_TEXT)
    thread_id = draw(st.none() | _TEXT | st.sampled_from(["t-1", "x" * 200, "a b", "01ABC"]))
    key = draw(st.none() | _TEXT)
    if draw(st.booleans()):
        body = {"to": to, "payload": draw(st.sampled_from(
            [f"<Item><n>{_escape(text)}</n></Item>", {"n": text}, {"Item": {"n": text}}]))}
        if thread_id is not None:
            body["thread_id"] = thread_id
        if key is not None:
            body["idempotency_key"] = key
        return {"content": json.dumps(body).encode(),
                "headers": {"Content-Type": "application/json"}, "params": {}}
    meta = "".join(f"<{tag}>{_escape(value)}</{tag}>" for tag, value in [
        ("id", draw(st.none() | _TEXT)), ("from", draw(st.none() | _TEXT)), ("to", to),
        ("thread", thread_id), ("parent", draw(st.none() | _TEXT))] if value is not None)
    envelope = (f'<message xmlns="{ENVELOPE_NS}"><meta>{meta}</meta>'
                f'<Item xmlns=""><n>{_escape(text)}</n></Item></message>')
    bare = f"<Item><n>{_escape(text)}</n></Item>"
    params = {"to": to} | ({"thread_id": thread_id} if thread_id is not None else {})
    headers = {"Content-Type": "application/xml"}
    if key is not None and key.isascii() and key.isprintable():
        headers["Idempotency-Key"] = key
    if draw(st.booleans()):
        return {"content": envelope.encode(), "headers": headers, "params": {}}
    return {"content": bare.encode(), "headers": headers, "params": params}


@st.composite
def _inject_request(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["bytes", "xml", "json", "nearly valid"]))
    if kind == "nearly valid":
        return draw(_nearly_valid())
    if kind == "bytes":
        body = draw(st.binary(max_size=64))
        content_type = draw(_CONTENT_TYPES)
    elif kind == "xml":
        body = draw(_xmlish()).encode()
        content_type = draw(st.sampled_from(["application/xml", "text/xml"]) | _CONTENT_TYPES)
    else:
        body = draw(_json_body())
        content_type = draw(st.just("application/json") | _CONTENT_TYPES)
    headers = {"Content-Type": content_type} if content_type else {}
    if draw(st.booleans()):
        headers["Idempotency-Key"] = draw(st.text(string.printable.strip(), max_size=20))
    params = {}
    for name, values in [("to", _NAMES), ("thread_id", _TEXT)]:
        if draw(st.booleans()):
            params[name] = draw(values)
    return {"content": body, "headers": headers, "params": params}


def _assert_error_shape(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details", "request_id"}, error
    assert STATUS_BY_CODE[error["code"]] == response.status_code, error
    # Words for a person. (Not always a sentence that ends in a full stop: a dict payload that
    # does not fit its schema ends with the schema library's own words.)
    assert len(error["message"].split()) >= 4, error
    assert error["request_id"] == response.headers["x-request-id"]
    return dict(error)


def _check_inject(http: httpx.Client, request: dict[str, Any]) -> None:
    response = http.post("/inject", **request)
    assert response.status_code in INJECT_STATUSES, (request, response.text)
    if response.status_code == 202:
        assert set(response.json()) == {"thread_id", "message_id"}
    else:
        _assert_error_shape(response)


def _inject_fuzz(base: str) -> None:
    with httpx.Client(base_url=f"{base}/api/v1", timeout=30) as http:
        _run(_inject_request(), lambda request: _check_inject(http, request),
             max_examples=RAW_EXAMPLES)


async def test_raw_inject_bodies_get_a_documented_status_and_never_a_5xx(
        organism: Organism, tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        await asyncio.to_thread(_inject_fuzz, base)
        health = (await http.get(base + "/health")).json()
        assert health["status"] == "ok"
        assert (await http.get("/organism/state")).json()["idle"] is True


_STREAM_QUERY = st.fixed_dictionaries({}, optional={
    "after": st.integers(-2, 10).map(str) | _TEXT,
    "thread": _TEXT, "agent": _NAMES, "type": st.sampled_from(
        ["MessageAccepted", "ThreadCompleted", "Nope", "", "MessageAccepted,Nope"]) | _TEXT})


def _check_stream(http: httpx.Client, query: dict[str, str]) -> None:
    with http.stream("GET", "/events", params=query) as response:
        assert response.status_code in (200, 400), query
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("text/event-stream")
        else:
            response.read()
            _assert_error_shape(response)


def _stream_fuzz(base: str) -> None:
    with httpx.Client(base_url=f"{base}/api/v1", timeout=30) as http:
        _run(_STREAM_QUERY, lambda query: _check_stream(http, query),
             max_examples=RAW_EXAMPLES // 4)


async def test_event_stream_queries_get_a_stream_or_a_400(organism: Organism,
                                                          tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _):
        await asyncio.to_thread(_stream_fuzz, base)


# ------------------------------------------------------------------ the corpus: what the fuzz found

_AS_JSON = {"Content-Type": "application/json"}
_AS_XML = {"Content-Type": "application/xml"}

#: (name, request, status, code, the message's start); each was a 500 or a misleading answer.
CORPUS = [
    ("lone surrogate in to", {"content": b'{"to": "\\ud800", "payload": "<Item><n>1</n></Item>"}',
                              "headers": _AS_JSON},
     400, "invalid_json", "The JSON body has a lone surrogate (an escape from \\ud800 to "
                          "\\udfff without its pair) in 'to'; send valid Unicode text."),
    ("lone surrogate in the XML text", {
        "content": b'{"to": "third", "payload": "<Item><n>\\udfff</n></Item>"}',
        "headers": _AS_JSON},
     400, "invalid_json", "The JSON body has a lone surrogate (an escape from \\ud800 to "
                          "\\udfff without its pair) in 'payload';"),
    ("lone surrogate in a dict payload", {
        "content": b'{"to": "third", "payload": {"n": ["x", "\\ud800"]}}', "headers": _AS_JSON},
     400, "invalid_json", "The JSON body has a lone surrogate (an escape from \\ud800 to "
                          "\\udfff without its pair) in 'payload.n[1]';"),
    ("lone surrogate in a key", {
        "content": b'{"to": "third", "payload": {"\\udc00": "1"}}', "headers": _AS_JSON},
     400, "invalid_json", "The JSON body has a lone surrogate (an escape from \\ud800 to "
                          "\\udfff without its pair) in the key 'payload.\\udc00';"),
    ("lone surrogate in thread_id", {
        "content": b'{"to": "third", "payload": {"n": "1"}, "thread_id": "t\\ud800"}',
        "headers": _AS_JSON},
     400, "invalid_json", "The JSON body has a lone surrogate (an escape from \\ud800 to "
                          "\\udfff without its pair) in 'thread_id';"),
    ("lone surrogate in idempotency_key", {
        "content": b'{"to": "third", "payload": {"n": "1"}, "idempotency_key": "\\udbff"}',
        "headers": _AS_JSON},
     400, "invalid_json", "The JSON body has a lone surrogate"),
    ("lone surrogate in an unknown field's name", {
        "content": b'{"to": "third", "payload": {"n": "1"}, "\\ud800": 1}', "headers": _AS_JSON},
     400, "invalid_json", "The JSON body has a lone surrogate (an escape from \\ud800 to "
                          "\\udfff without its pair) in the key '\\ud800';"),
    ("arrays nested past the recursion limit", {"content": b"[" * 100_000, "headers": _AS_JSON},
     400, "invalid_json", "The body is not valid JSON: its arrays or objects nest too deeply to "
                          "parse; send a flatter document."),
    ("a payload nested past the recursion limit", {
        "content": b'{"to": "third", "payload": ' + b'{"n": ' * 20_000 + b"1" + b"}" * 20_001,
        "headers": _AS_JSON},
     400, "invalid_json", "The body is not valid JSON: its arrays or objects nest too deeply"),
    ("a number too long for int()", {
        "content": b'{"to": "third", "payload": {"n": ' + b"9" * 5000 + b"}}", "headers": _AS_JSON},
     400, "invalid_json", "The body has a number of more than 4300 digits; send it as a string."),
    ("JSON that is not UTF-8", {"content": '{"to": "third", "payload": {"n": "\xe9"}}'.encode(
        "latin-1"), "headers": _AS_JSON},
     400, "invalid_json", "The body is not valid JSON: byte 0xe9 at offset 34 is not utf-8; send "
                          "the JSON in UTF-8."),
    ("an empty JSON body", {"content": b"", "headers": _AS_JSON},
     400, "invalid_json", "The body is not valid JSON: Expecting value at line 1, column 1; send "
                          "one JSON object with 'to' and 'payload'."),
    ("an empty idempotency key", {"json": {"to": "third", "payload": {"n": "1"},
                                           "idempotency_key": ""}},
     400, "invalid_request", "The JSON body is not valid: 'idempotency_key' must not be empty "
                             "(leave it out for none)."),
    ("a thread id the envelope cannot carry", {
        "content": b"<Item><n>1</n></Item>", "headers": _AS_XML,
        "params": {"to": "third", "thread_id": "a\x00b"}},
     400, "invalid_envelope", "The thread id 'a\\x00b' is not valid"),
    ("a character reference to a surrogate", {
        "content": b"<Item><n>&#xD800;</n></Item>", "headers": _AS_XML, "params": {"to": "third"}},
     400, "malformed_xml", "The document is not well-formed XML"),
    ("a payload in the envelope's namespace", {
        "content": f'<Item xmlns="{ENVELOPE_NS}"><n>1</n></Item>'.encode(), "headers": _AS_XML,
        "params": {"to": "third"}},
     422, "invalid_payload", "The payload is <Item> in namespace"),
]


@pytest.mark.parametrize("name,request_kwargs,status,code,message", CORPUS,
                         ids=[c[0] for c in CORPUS])
async def test_corpus_inject(organism: Organism, tmp_path: Path, name: str,
                             request_kwargs: dict[str, Any], status: int, code: str,
                             message: str) -> None:
    data = tmp_path / "events"
    async with running_server(organism, data) as (base, _), client(base) as http:
        response = await http.post("/inject", **request_kwargs)
        assert response.status_code == status, response.text
        error = _assert_error_shape(response)
        assert error["code"] == code
        assert error["message"].startswith(message), error["message"]
        assert (await http.get(base + "/health")).json()["status"] == "ok"
    log = await open_file_log(data, readonly=True)
    rejected = [r.event async for r in log.read() if isinstance(r.event, MessageRejected)]
    await log.aclose()
    assert [r.reason for r in rejected] == [code]  # recorded, whatever the input held


QUERY_CORPUS = [
    # int() takes these, but they are not the whole numbers the document promises.
    ("/threads", {"limit": "5_0"}, 400), ("/threads", {"limit": " 5"}, 400),
    ("/threads", {"limit": "\u0665"}, 400), ("/threads", {"offset": "9" * 5000}, 400),
    ("/messages", {"after": "4611686018427387905"}, 400), ("/threads", {"status": "nope"}, 400),
    # A newline in a path segment matches no route.
    ("/usage/models/a%0Ab", {}, 404), ("/threads/%00", {}, 404), ("/agents/%FF%FE", {}, 404),
]


@pytest.mark.parametrize("path,params,status", QUERY_CORPUS)
async def test_corpus_queries(organism: Organism, tmp_path: Path, path: str,
                              params: dict[str, str], status: int) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        response = await http.get(path, params=params)
        assert response.status_code == status, response.text
        _assert_error_shape(response)


async def test_an_empty_idempotency_key_header_is_no_key(organism: Organism,
                                                         tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        answers = [(await http.post("/inject", content=b"<Item><n>1</n></Item>",
                                    params={"to": "third"},
                                    headers={**_AS_XML, "Idempotency-Key": ""})).json()
                   for _ in range(2)]
        assert answers[0]["message_id"] != answers[1]["message_id"]


async def test_a_dead_letter_of_a_killed_thread_is_not_retried(organism: Organism,
                                                               tmp_path: Path) -> None:
    async with running_server(organism, tmp_path / "events") as (base, _), client(base) as http:
        ids = (await http.post("/inject", json={"to": "failing",
                                                "payload": "<Item><n>1</n></Item>"})).json()
        await http.get("/organism/state")
        [dead] = (await http.get("/dead-letters")).json()["dead_letters"]
        assert (await http.post(f"/threads/{ids['thread_id']}/kill")).status_code == 200
        retried = await http.post(f"/dead-letters/{dead['message_id']}/retry")
        assert retried.status_code == 409
        assert _assert_error_shape(retried)["code"] == "thread_closed"


async def test_a_client_that_hangs_up_mid_body_is_no_internal_error(
        organism: Organism, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(organism, data=tmp_path / "events")
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "http.request", "body": b"<Item><n>", "more_body": True},
                {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/api/v1/inject", "raw_path":
             b"/api/v1/inject", "root_path": "", "query_string": b"to=third",
             "headers": [(b"content-type", b"application/xml"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    async with app.router.lifespan_context(app):
        scope["app"] = app
        await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["code"] == "client_disconnected"
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []

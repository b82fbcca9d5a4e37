"""LLM agents on the real anthropic SDK against a local stub of the Messages API: prompts,
usage that adds up exactly (before and after a restart), budgets enforced before the call,
self-correction after a SystemError turn, and never paying twice."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import write_organism
from tests.messages_stub import Answer, Stub, messages_stub
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.events import BudgetExhausted, ModelResponded, TokensUsed
from xml_pipeline.log.file import open_file_log
from xml_pipeline.runtime.pump import open_pump
from xml_pipeline.state import replay

NOTE_XSD = """<?xml version="1.0"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Note"><xs:complexType><xs:sequence>
    <xs:element name="text" type="xs:string"/>
  </xs:sequence></xs:complexType></xs:element>
</xs:schema>
"""

_modules = itertools.count()


def organism_text(module: str, *, thread_tokens: int = 100000) -> str:
    return f"""
organism: {{name: agents, budgets: {{thread_tokens: {thread_tokens}}}}}
listeners:
  - name: planner
    description: Plans the work and reports back.
    payload: schemas/note.xsd
    agent: {{model: claude-sonnet-4-6, system: You plan. Ask the researcher., max_tokens: 50}}
    peers: [researcher]
  - name: researcher
    description: Finds facts, using the lookup tool.
    payload: schemas/note.xsd
    agent: {{model: claude-haiku-4-5, system: You research., max_tokens: 40}}
    peers: [lookup, planner]
  - name: lookup
    description: Looks a word up (upper-cases it).
    payload: schemas/note.xsd
    handler: "{module}:lookup"
"""


TOOL = """
async def lookup(payload, ctx):
    await ctx.reply(f"<Note><text>{payload.findtext('text').upper()}</text></Note>")
"""


def send(to: str, text: str) -> str:
    return f'Sure.\n<send to="{to}"><Note><text>{text}</text></Note></send>\nThanks.'


SCRIPT = [
    Answer(send("researcher", "find x"), 100, 20),      # planner, from api
    Answer(send("lookup", "x"), 80, 10),                 # researcher, from planner
    Answer(send("planner", "found X"), 120, 15),         # researcher, from lookup
    Answer("<done/>", 150, 3),                           # planner, from researcher
]


@pytest.fixture
async def stub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stub]:
    async with messages_stub() as stub:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", stub.url)
        yield stub


def make(tmp_path: Path, **kwargs: int) -> Organism:
    module = f"llm_tools_{next(_modules)}"
    path = write_organism(tmp_path / "org", organism_text(module, **kwargs),
                          schemas={"note.xsd": NOTE_XSD}, modules={module: TOOL})
    return load_organism(path)


async def test_two_agents_and_a_tool_usage_adds_up_exactly(stub: Stub, tmp_path: Path) -> None:
    stub.script(*SCRIPT)
    organism = make(tmp_path)
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log) as pump:
        accepted = await pump.inject("<Note><text>task</text></Note>", to="planner")
        await pump.wait_idle()
        state = pump.state
        assert state.threads.threads[accepted.thread_id].status == "completed"
        usage = state.budgets
        assert usage.threads[accepted.thread_id].prompt_tokens == 100 + 80 + 120 + 150
        assert usage.threads[accepted.thread_id].completion_tokens == 20 + 10 + 15 + 3
        assert usage.usage_by_agent["planner"].prompt_tokens == 250
        assert usage.usage_by_agent["researcher"].completion_tokens == 25
        assert usage.usage_by_model["claude-haiku-4-5"].request_count == 2
        assert usage.usage_by_model["claude-sonnet-4-6"].total_cost == pytest.approx(
            (250 * 3 + 23 * 15) / 1e6)
        assert usage.threads[accepted.thread_id].reserved == 0
        live = state.digest()
    # The requests: system prompt with the peers, max_tokens, and the history.
    first, second, third, fourth = stub.requests
    assert (first["model"], first["max_tokens"]) == ("claude-sonnet-4-6", 50)
    assert first["system"].startswith("You plan. Ask the researcher.")
    assert "### researcher\nFinds facts, using the lookup tool." in first["system"]
    assert '<xs:element name="Note">' in first["system"]
    assert first["messages"] == [{"role": "user", "content":
                                  '<received from="api"><Note xmlns=""><text>task</text>'
                                  "</Note></received>"}]
    assert third["messages"][0]["content"].startswith('<received from="planner">')
    assert third["messages"][1] == {"role": "assistant", "content": SCRIPT[1].text}
    assert "<text>X</text>" in third["messages"][2]["content"]
    assert [m["role"] for m in fourth["messages"]] == ["user", "assistant", "user"]
    # After a restart, usage is the same: it is a fold of the log, and nothing is called.
    calls = len(stub.requests)
    async with open_pump(organism, log) as pump:
        await pump.wait_idle()
        assert pump.state.budgets.usage_by_agent == state.budgets.usage_by_agent
        assert pump.state.budgets.threads == state.budgets.threads
    assert len(stub.requests) == calls
    replayed = await replay(log)
    await log.aclose()
    assert replayed.budgets.usage_by_model == state.budgets.usage_by_model
    assert live  # the digest was taken while running
    used = [e for e in [r.event async for r in (await open_file_log(
        tmp_path / "events", readonly=True)).read()] if isinstance(e, TokensUsed)]
    assert sum(e.input_tokens for e in used) == 450


async def test_a_thread_over_budget_is_paused_before_the_call(stub: Stub, tmp_path: Path
                                                              ) -> None:
    stub.script(*SCRIPT)
    organism = make(tmp_path, thread_tokens=400)
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log) as pump:
        accepted = await pump.inject("<Note><text>task</text></Note>", to="planner")
        await pump.wait_idle()
        thread = pump.state.threads.threads[accepted.thread_id]
        assert thread.status == "paused"
        exhausted = [r.event async for r in log.read() if isinstance(r.event, BudgetExhausted)]
        assert [(e.scope, e.key, e.limit) for e in exhausted] == [
            ("thread", accepted.thread_id, 400)]
        made = len(stub.requests)
        assert made < len(SCRIPT)  # the call that would exceed the budget was not made
        assert exhausted[0].used + exhausted[0].requested > 400
        await pump.raise_budget("thread", accepted.thread_id, 10_000, by="test")
        await pump.wait_idle()
        assert pump.state.threads.threads[accepted.thread_id].status == "completed"
        assert len(stub.requests) == len(SCRIPT)
    await log.aclose()


async def test_an_invalid_answer_is_corrected_after_a_system_error_turn(stub: Stub,
                                                                        tmp_path: Path) -> None:
    stub.script(Answer('<send to="researcher"><Note><text>oops</Note></send>', 30, 7),
                *SCRIPT)
    organism = make(tmp_path)
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log) as pump:
        accepted = await pump.inject("<Note><text>task</text></Note>", to="planner")
        await pump.wait_idle()
        assert pump.state.threads.threads[accepted.thread_id].status == "completed"
        assert pump.state.budgets.usage_by_agent["planner"].prompt_tokens == 30 + 250
    correction = stub.requests[1]
    assert [m["role"] for m in correction["messages"]] == ["user", "assistant", "user"]
    assert correction["messages"][1]["content"] == \
        '<send to="researcher"><Note><text>oops</Note></send>'
    assert correction["messages"][2]["content"].startswith(
        '<SystemError xmlns="urn:xml-pipeline:system:v1"><code>invalid_answer</code>'
        "<message>The message to 'researcher' is not one well-formed XML element:")
    await log.aclose()


async def test_a_redelivered_agent_message_never_pays_twice(stub: Stub, tmp_path: Path
                                                            ) -> None:
    # The first answer is invalid, so a correction call follows; the process stops while the
    # correction is in flight. After the restart, the first answer comes from the log.
    stub.script(Answer("no xml here", 30, 7), Answer(send("researcher", "x"), 40, 8, hold=True))
    organism = make(tmp_path)
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log, stop_timeout=0.01) as pump:
        await pump.inject("<Note><text>task</text></Note>", to="planner")
        await stub.held.wait()
    await log.aclose()
    stub.release.set()
    stub.script(Answer(send("researcher", "x"), 40, 8), Answer("<done/>", 5, 1))
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log) as pump:
        await pump.wait_idle()
    responded = [r.event async for r in log.read() if isinstance(r.event, ModelResponded)]
    await log.aclose()
    assert len(stub.requests) == 4  # step 0 once, the held step 1, step 1 again, researcher
    assert stub.requests[2]["messages"] == stub.requests[1]["messages"]
    assert [e.key.split("#")[1] for e in responded if e.agent == "planner"] == ["0", "1"]


async def test_rate_limits_are_retried_and_other_errors_fail_the_handler(stub: Stub,
                                                                         tmp_path: Path) -> None:
    from xml_pipeline.events import HandlerFailed

    stub.script(Answer("slow down", status=429), Answer("overloaded", status=529), *SCRIPT)
    organism = make(tmp_path)
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log) as pump:
        accepted = await pump.inject("<Note><text>task</text></Note>", to="planner")
        await pump.wait_idle()
        assert pump.state.threads.threads[accepted.thread_id].status == "completed"
        assert pump.state.budgets.usage.request_count == 4  # retries are not counted twice
        stub.script(Answer("your request is bad", status=400))
        failed = await pump.inject("<Note><text>again</text></Note>", to="planner")
        await pump.wait_idle()
        errors = [r.event async for r in log.read() if isinstance(r.event, HandlerFailed)]
        assert [e.error for e in errors] == [
            "AgentError: The Anthropic API refused the call (400): your request is bad"]
        assert pump.state.threads.threads[failed.thread_id].status == "failed"
        assert pump.state.budgets.threads[failed.thread_id].reserved == 0
    await log.aclose()
    assert len(stub.requests) == 7


async def test_a_missing_api_key_is_reported_not_a_crash(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import httpx

    from tests.api_server import running_server
    from xml_pipeline.events import HandlerFailed

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    organism = make(tmp_path)
    async with running_server(organism, tmp_path / "events") as (base, _):
        async with httpx.AsyncClient(base_url=base + "/api/v1") as http:
            agent = (await http.get("/agents/planner")).json()
            assert agent["error"] == "ANTHROPIC_API_KEY is not set; the agent cannot call the " \
                                     "model."
            assert (await http.get("/agents/lookup")).json()["error"] is None
            await http.post("/inject", json={"to": "planner",
                                             "payload": "<Note><text>x</text></Note>"})
            await http.get("/organism/state")
    log = await open_file_log(tmp_path / "events", readonly=True)
    failures = [r.event async for r in log.read() if isinstance(r.event, HandlerFailed)]
    await log.aclose()
    assert failures[0].error == ("AgentError: ANTHROPIC_API_KEY is not set; set it in the "
                                 "environment of 'xml-pipeline run' to run LLM agents.")


async def test_crossing_75_percent_records_a_warning(stub: Stub, tmp_path: Path) -> None:
    from xml_pipeline.events import BudgetWarned

    stub.script(Answer(send("researcher", "find x"), 1500, 20), *SCRIPT[1:])
    organism = make(tmp_path, thread_tokens=2000)
    log = await open_file_log(tmp_path / "events")
    async with open_pump(organism, log) as pump:
        accepted = await pump.inject("<Note><text>task</text></Note>", to="planner")
        await pump.wait_idle()
        warned = [r.event async for r in log.read() if isinstance(r.event, BudgetWarned)]
        assert [(w.scope, w.key, w.percent, w.used, w.limit) for w in warned][0] == (
            "thread", accepted.thread_id, 75, 1520, 2000)
        assert pump.state.budgets.warnings[f"thread:{accepted.thread_id}"] >= 75
    await log.aclose()

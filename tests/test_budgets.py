"""Every gauge that holds a thread can be seen and raised, over a real server and the CLI.

A thread whose agent's next call would exceed a budget is paused. Its budget view names every
gauge that applies (the thread's, each agent's in the thread, each agent's, the organism's)
and the one that holds it; each can be raised (``POST /usage/threads/{id}/budget`` with or
without ``agent``, ``/usage/agents/{name}/budget``, ``/usage/organism/budget``), and a raise
that does not free the thread says which gauge still holds it, without calling again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import running_server
from tests.conftest import write_organism
from tests.messages_stub import Answer, Stub, messages_stub
from tests.test_llm import NOTE_XSD
from xml_pipeline.cli import main
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.events import BudgetExhausted, BudgetRaised, Event
from xml_pipeline.log.file import open_file_log
from xml_pipeline.state import replay

_folders = itertools.count()


def make(tmp_path: Path, *, budget: str, organism_budgets: str = "thread_tokens: 100000"
         ) -> Organism:
    text = f"""
organism: {{name: gauges, budgets: {{{organism_budgets}}}}}
listeners:
  - name: planner
    description: Plans the work.
    payload: schemas/note.xsd
    agent: {{model: claude-haiku-4-5, system: You plan., max_tokens: 1000}}
    budget: {{{budget}}}
"""
    folder = tmp_path / f"org{next(_folders)}"
    return load_organism(write_organism(folder, text, schemas={"note.xsd": NOTE_XSD}))


@pytest.fixture
async def stub(monkeypatch: pytest.MonkeyPatch) -> Any:
    async with messages_stub() as stub:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", stub.url)
        yield stub


async def _events(data: Path) -> list[Event]:
    log = await open_file_log(data, readonly=True)
    try:
        return [record.event async for record in log.read()]
    finally:
        await log.aclose()


async def _paused_thread(http: httpx.AsyncClient) -> str:
    answer = await http.post("/inject", json={"to": "planner",
                                              "payload": "<Note><text>go</text></Note>"})
    assert answer.status_code == 202
    thread = str(answer.json()["thread_id"])
    await http.get("/organism/state")  # waits until nothing is in flight
    assert (await http.get(f"/threads/{thread}")).json()["status"] == "paused"
    return thread


async def test_a_thread_held_by_its_agent_in_thread_gauge_is_seen_and_raised(
        stub: Stub, tmp_path: Path) -> None:
    stub.script(Answer("<done/>", 100, 3))
    organism = make(tmp_path, budget="thread_tokens: 300")
    data = tmp_path / "events"
    async with running_server(organism, data) as (base, _):
        async with httpx.AsyncClient(base_url=base + "/api/v1") as http:
            thread = await _paused_thread(http)
            (exhausted,) = [e for e in await _events(data) if isinstance(e, BudgetExhausted)]
            assert (exhausted.scope, exhausted.key) == ("thread-agent", f"{thread}|planner")
            needs = exhausted.requested
            assert needs > 1000

            view = (await http.get(f"/usage/threads/{thread}")).json()
            assert (view["status"], view["is_exhausted"]) == ("paused", True)
            assert [(g["scope"], g["agent"], g["limit"], g["used"], g["reserved"],
                     g["holding"]) for g in view["gauges"]] == [
                ("thread", None, 100000, 0, 0, False),
                ("thread-agent", "planner", 300, 0, 0, True),
                ("agent", "planner", None, 0, 0, False),
                ("organism", None, None, 0, 0, False)]
            held = {k: view["stopped_by"][k] for k in
                    ("scope", "key", "agent", "limit", "used", "reserved", "requested")}
            assert held == {"scope": "thread-agent", "key": f"{thread}|planner",
                            "agent": "planner", "limit": 300, "used": 0, "reserved": 0,
                            "requested": needs}

            # Raising the thread's own gauge does not free it, and says what still holds it.
            raised = await http.post(f"/usage/threads/{thread}/budget",
                                     json={"max_tokens": 100000})
            assert raised.status_code == 200
            body = raised.json()
            assert (body["max_tokens"], body["status"]) == (100000, "paused")
            still = body["still_held_by"]
            assert {k: still[k] for k in ("scope", "agent", "limit", "used", "requested")} == {
                "scope": "thread-agent", "agent": "planner", "limit": 300, "used": 0,
                "requested": needs}
            assert still["message"] == (
                f"Thread {thread} is still paused: planner's budget in this thread allows "
                f"300 tokens (0 used, 0 reserved) and its next call needs up to {needs}. "
                f"Raise it with POST /api/v1/usage/threads/{thread}/budget "
                f'{{"max_tokens": {needs}, "agent": "planner"}} or more.')
            await http.get("/organism/state")
            assert (await http.get(f"/threads/{thread}")).json()["status"] == "paused"
            assert len(stub.requests) == 0
            events = await _events(data)
            assert sum(isinstance(e, BudgetExhausted) for e in events) == 1  # not tried again
            assert [e.held for e in events if isinstance(e, BudgetRaised)] == [
                (f"{thread}|planner",)]

            # Raising the agent's gauge in this thread lets it go on.
            raised = await http.post(f"/usage/threads/{thread}/budget",
                                     json={"max_tokens": 5000, "agent": "planner"})
            assert raised.status_code == 200
            assert raised.json()["still_held_by"] is None
            await http.get("/organism/state")
            assert (await http.get(f"/threads/{thread}")).json()["status"] == "completed"
            assert len(stub.requests) == 1
            view = (await http.get(f"/usage/threads/{thread}")).json()
            assert view["stopped_by"] is None and view["is_exhausted"] is False
            assert [(g["scope"], g["limit"], g["used"]) for g in view["gauges"][:2]] == [
                ("thread", 100000, 103), ("thread-agent", 5000, 103)]

            # Bad requests, in the standard error envelope.
            nobody = await http.post(f"/usage/threads/{thread}/budget",
                                     json={"max_tokens": 10, "agent": "nobody"})
            assert nobody.status_code == 404
            assert nobody.json()["error"]["code"] == "not_found"
            assert nobody.json()["error"]["details"] == {"agent": "nobody"}
            missing = await http.post("/usage/threads/nope/budget", json={"max_tokens": 10})
            assert missing.status_code == 404
            assert missing.json()["error"]["details"] == {"thread_id": "nope"}
            for bad in ({"max_tokens": 0}, {"max_tokens": "5"}, {"max_tokens": True},
                        {"max_tokens": 10, "agent": 5}, {"max_tokens": 10, "extra": 1}, []):
                answer = await http.post(f"/usage/threads/{thread}/budget", json=bad)
                assert answer.status_code == 400, bad
                assert answer.json()["error"]["code"] == "invalid_request"
            live = (await http.get("/organism/state")).json()["digest"]
    # After a restart the raised gauges are the same: the raises are in the log.
    async with running_server(organism, data) as (base, _):
        async with httpx.AsyncClient(base_url=base + "/api/v1") as http:
            view = (await http.get(f"/usage/threads/{thread}")).json()
            assert [(g["scope"], g["limit"]) for g in view["gauges"][:2]] == [
                ("thread", 100000), ("thread-agent", 5000)]
    log = await open_file_log(data, readonly=True)
    replayed = await replay(log)
    await log.aclose()
    assert replayed.budgets.thread_agents[f"{thread}|planner"].limit == 5000
    assert live  # the live state was taken while serving


async def test_agent_and_organism_gauges_are_raised_by_their_own_routes_and_the_cli(
        stub: Stub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stub.script(Answer("<done/>", 100, 3))
    organism = make(tmp_path, budget="agent_tokens: 400",
                    organism_budgets="thread_tokens: 100000, organism_tokens: 500")
    data = tmp_path / "events"
    async with running_server(organism, data) as (base, _):
        def run(*argv: str) -> tuple[int, str, str]:
            code = main([*argv, "--url", base])
            out, err = capsys.readouterr()
            return code, out, err

        async with httpx.AsyncClient(base_url=base + "/api/v1") as http:
            thread = await _paused_thread(http)
            (exhausted,) = [e for e in await _events(data) if isinstance(e, BudgetExhausted)]
            needs = exhausted.requested
            view = (await http.get(f"/usage/threads/{thread}")).json()
            assert (view["stopped_by"]["scope"], view["stopped_by"]["key"]) == (
                "agent", "planner")

            code, out, _ = await asyncio.to_thread(run, "usage")
            assert code == 0
            assert f"  {thread} paused: planner's call needs up to {needs} tokens; agent " \
                   "planner's budget allows 400 (0 used, 0 reserved)" in out

            # The agent's gauge: the organism's still holds the thread.
            code, out, _ = await asyncio.to_thread(
                run, "budget", "--agent", "planner", "--max-tokens", "100000")
            assert code == 0
            assert out == (
                "agent planner: [------------------------] 0/100000   0.0%\n"
                f"thread {thread} is still paused: planner's call needs up to {needs} "
                "tokens; the organism's budget allows 500 (0 used, 0 reserved). Raise it "
                f"with: xml-pipeline budget --organism --max-tokens {needs}\n")
            agent = (await http.get("/usage/agents/planner")).json()
            assert agent["budget"]["max_tokens"] == 100000
            assert (await http.get(f"/threads/{thread}")).json()["status"] == "paused"

            # The organism's gauge: now it goes on.
            code, out, _ = await asyncio.to_thread(
                run, "budget", "--organism", "--max-tokens", "100000", "--json")
            assert code == 0
            answer = json.loads(out)
            assert (answer["budget"]["max_tokens"], answer["resumed"], answer["still_held"]) \
                == (100000, [thread], [])
            await http.get("/organism/state")
            assert (await http.get(f"/threads/{thread}")).json()["status"] == "completed"

            # A thread's gauges from the CLI.
            code, out, _ = await asyncio.to_thread(
                run, "budget", thread, "--agent", "planner", "--max-tokens", "7000")
            assert (code, out) == (0, f"planner in thread {thread}: [------------------------] "
                                      "103/7000   1.5%\n")
            code, out, _ = await asyncio.to_thread(run, "budget", thread, "--max-tokens", "200")
            assert (code, out) == (0, f"thread {thread}: [############------------] "
                                      "103/200  51.5%\n")

            # The routes refuse what is not there or not a number.
            nobody = await http.post("/usage/agents/nobody/budget", json={"max_tokens": 1})
            assert (nobody.status_code, nobody.json()["error"]["details"]) == (
                404, {"agent": "nobody"})
            for route in ("/usage/agents/planner/budget", "/usage/organism/budget"):
                bad = await http.post(route, json={"max_tokens": -1})
                assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_request")

        # The organism answers for what only it knows.
        code, _, err = await asyncio.to_thread(run, "budget", "--agent", "nobody",
                                               "--max-tokens", "5")
        assert (code, err) == (
            1, "There is no agent 'nobody'; 'xml-pipeline usage' lists the agents.\n")


@pytest.mark.parametrize(("argv", "complaint"), [
    (["--max-tokens", "5"], "Say which budget to set: a THREAD, --agent NAME, or --organism."),
    (["t1", "--organism", "--max-tokens", "5"],
     "--organism sets the organism's budget; it takes no THREAD and no --agent."),
    (["t1", "--agent", "", "--max-tokens", "5"], "--agent must name an agent, not be empty."),
    (["", "--max-tokens", "5"], "THREAD must name a thread, not be empty."),
    (["t1", "--max-tokens", "0"], "--max-tokens must be a whole number from 1 to 10^12, not 0."),
    (["t1", "--max-tokens", "-5"],
     "--max-tokens must be a whole number from 1 to 10^12, not '-5'."),
    (["--organism", "--max-tokens", "abc"],
     "--max-tokens must be a whole number from 1 to 10^12, not 'abc'."),
    (["--agent", "planner", "--max-tokens", "1.5"],
     "--max-tokens must be a whole number from 1 to 10^12, not '1.5'."),
    (["t1", "--max-tokens", "1_000"],
     "--max-tokens must be a whole number from 1 to 10^12, not '1_000'."),
    (["t1", "--max-tokens", "1000000000001"],
     "--max-tokens must be a whole number from 1 to 10^12, not 1000000000001."),
])
def test_the_budget_command_refuses_what_it_cannot_mean_before_any_request(
        argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 9: a request would fail with exit 1, not 2.
    code = main(["budget", *argv, "--url", "http://127.0.0.1:9"])
    assert (code, capsys.readouterr().err) == (2, f"xml-pipeline budget: {complaint}\n")


async def test_a_held_thread_is_still_held_after_a_restart_and_a_raise_then_frees_it(
        stub: Stub, tmp_path: Path) -> None:
    stub.script(Answer("<done/>", 100, 3))
    organism = make(tmp_path, budget="thread_tokens: 300")
    data = tmp_path / "events"
    async with running_server(organism, data) as (base, _):
        async with httpx.AsyncClient(base_url=base + "/api/v1") as http:
            thread = await _paused_thread(http)
            before = (await http.get(f"/usage/threads/{thread}")).json()["stopped_by"]
            raised = await http.post(f"/usage/threads/{thread}/budget",
                                     json={"max_tokens": 900, "agent": "planner"})
            assert raised.json()["still_held_by"]["limit"] == 900  # still short
    async with running_server(organism, data) as (base, _):
        async with httpx.AsyncClient(base_url=base + "/api/v1") as http:
            await http.get("/organism/state")
            view = (await http.get(f"/usage/threads/{thread}")).json()
            assert view["status"] == "paused"
            assert {k: view["stopped_by"][k] for k in ("scope", "agent", "requested")} == {
                k: before[k] for k in ("scope", "agent", "requested")}
            assert view["stopped_by"]["limit"] == 900
            raised = await http.post(f"/usage/threads/{thread}/budget",
                                     json={"max_tokens": 5000, "agent": "planner"})
            assert (raised.json()["still_held_by"], raised.json()["resumed"]) == (None, [thread])
            await http.get("/organism/state")
            assert (await http.get(f"/threads/{thread}")).json()["status"] == "completed"
    assert len(stub.requests) == 1

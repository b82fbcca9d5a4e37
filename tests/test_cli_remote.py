"""CLI commands that talk to a running organism over its API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests import handlers
from tests.api_server import running_server
from tests.conftest import write_organism
from tests.test_pump import ITEM_XSD, ORGANISM
from xml_pipeline.cli import main
from xml_pipeline.config import load_organism


async def test_inject_threads_dead_letters_and_reload(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    handlers.reset()
    path = write_organism(tmp_path / "org", ORGANISM, schemas={"item.xsd": ITEM_XSD})
    async with running_server(load_organism(path), tmp_path / "events") as (base, _):
        def run(*argv: str) -> tuple[int, str, str]:
            code = main([*argv, "--url", base])
            out, err = capsys.readouterr()
            return code, out, err

        code, out, _ = await asyncio.to_thread(run, "inject", "--to", "first",
                                               "<Item><n>1</n></Item>", "--json")
        assert code == 0
        ids = json.loads(out)
        code, _, err = await asyncio.to_thread(run, "inject", "--to", "nobody", "<Item/>")
        assert code == 1
        assert err.startswith("rejected (unknown_listener): There is no listener 'nobody'")
        await asyncio.to_thread(run, "inject", "--to", "failing", "<Item><n>1</n></Item>")
        code, out, _ = await asyncio.to_thread(run, "threads", "--json")
        assert code == 0
        assert ids["thread_id"] in [t["thread_id"] for t in json.loads(out)["threads"]]
        import httpx
        async with httpx.AsyncClient(base_url=base) as http:
            await http.get("/api/v1/organism/state")  # answers once idle: the retries are over
        code, out, _ = await asyncio.to_thread(run, "dead-letters")
        assert code == 0 and out.startswith("1 dead letters") and "failing" in out
        (tmp_path / "org" / "organism.yaml").write_text(
            (tmp_path / "org" / "organism.yaml").read_text().replace(
                "{name: first, description: d,", "{name: first, description: changed,"))
        code, out, _ = await asyncio.to_thread(run, "reload")
        assert (code, out) == (0, "reloaded: added none, removed none, updated ['first']\n")
        (tmp_path / "org" / "organism.yaml").write_text("organism: {name: x}\n")
        code, _, err = await asyncio.to_thread(run, "reload")
        assert code == 1
        assert "The 'listeners:' list is missing" in err


async def test_usage_shows_gauges(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.messages_stub import messages_stub
    from tests.test_llm import SCRIPT, make

    async with messages_stub() as stub:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", stub.url)
        stub.script(*SCRIPT)
        organism = make(tmp_path, thread_tokens=2000)
        async with running_server(organism, tmp_path / "events") as (base, _):
            def run(*argv: str) -> tuple[int, str]:
                code = main([*argv, "--url", base])
                return code, capsys.readouterr().out

            code, out = await asyncio.to_thread(
                run, "inject", "--to", "planner", "<Note><text>go</text></Note>", "--json")
            thread = json.loads(out)["thread_id"]
            await asyncio.to_thread(run, "threads")  # waits for nothing; just a call
            import httpx
            async with httpx.AsyncClient(base_url=base) as http:
                await http.get("/api/v1/organism/state")
            code, out = await asyncio.to_thread(run, "usage")
    assert code == 0
    assert out.splitlines()[0].startswith("usage since the start: 450 in, 48 out, 4 calls, $")
    assert "  planner    [" in out and "no limit" in out
    line = next(line for line in out.splitlines() if thread in line)
    assert "498/2000  24.9%" in line


async def test_budget_command_resumes_a_paused_thread(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.messages_stub import messages_stub
    from tests.test_llm import SCRIPT, make

    async with messages_stub() as stub:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", stub.url)
        stub.script(*SCRIPT)
        organism = make(tmp_path, thread_tokens=400)
        async with running_server(organism, tmp_path / "events") as (base, _):
            import httpx

            def run(*argv: str) -> tuple[int, str]:
                code = main([*argv, "--url", base])
                return code, capsys.readouterr().out

            code, out = await asyncio.to_thread(
                run, "inject", "--to", "planner", "<Note><text>go</text></Note>", "--json")
            thread = json.loads(out)["thread_id"]
            async with httpx.AsyncClient(base_url=base + "/api/v1") as http:
                await http.get("/organism/state")
                assert (await http.get(f"/threads/{thread}")).json()["status"] == "paused"
                budget = (await http.get(f"/usage/threads/{thread}")).json()
                assert budget["is_exhausted"] is True and budget["max_tokens"] == 400
                code, out = await asyncio.to_thread(run, "budget", thread, "--max-tokens",
                                                    "5000")
                assert code == 0 and out.startswith(f"thread {thread}: [")
                await http.get("/organism/state")
                assert (await http.get(f"/threads/{thread}")).json()["status"] == "completed"
                budget = (await http.get(f"/usage/threads/{thread}")).json()
                assert (budget["max_tokens"], budget["total_tokens"]) == (5000, 498)
                bad = await http.post(f"/usage/threads/{thread}/budget", json={"max": 1})
                assert bad.status_code == 400
                missing = await http.post("/usage/threads/nope/budget",
                                          json={"max_tokens": 1})
                assert missing.status_code == 404

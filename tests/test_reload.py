"""Hot reload with the real watcher on real files: edits of organism.yaml, XSDs and handler
modules of a running organism take effect, bad edits are refused, nothing is lost."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_organism
from xml_pipeline.config import load_organism
from xml_pipeline.errors import OrganismError
from xml_pipeline.events import (
    HandlerSucceeded,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    OrganismReloaded,
    ReloadRejected,
)
from xml_pipeline.log.file import FileLog, open_file_log
from xml_pipeline.runtime.pump import Pump, open_pump
from xml_pipeline.runtime.reload import ReloadResult, reload_organism, watch
from xml_pipeline.state import replay

ITEM_XSD = """<?xml version="1.0"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Item"><xs:complexType><xs:sequence>
    <xs:element name="n" type="xs:string"/>
  </xs:sequence></xs:complexType></xs:element>
</xs:schema>
"""
TIGHT_XSD = ITEM_XSD.replace('<xs:element name="n" type="xs:string"/>', '''<xs:element name="n">
      <xs:simpleType><xs:restriction base="xs:string">
        <xs:maxLength value="3"/>
      </xs:restriction></xs:simpleType>
    </xs:element>''')

_modules = itertools.count()


def handlers_source(word: str) -> str:
    return textwrap.dedent(f"""
        seen = []

        async def record(payload, ctx):
            seen.append((ctx.name, payload.findtext("n"), "{word}"))
    """)


def organism_yaml(module: str, *, extra: str = "", description: str = "d",
                  with_b: bool = True) -> str:
    b = (f"""  - {{name: b, description: d, payload: schemas/item.xsd,
     handler: "{module}:record"}}\n""" if with_b else "")
    return (f"""organism: {{name: reload-test}}
listeners:
  - {{name: a, description: {description}, payload: schemas/item.xsd,
     handler: "{module}:record"}}
""" + b + extra)


def new_organism(folder: Path) -> tuple[str, Path]:
    """organism.yaml with listeners a and b, and their handler module (a new name each time:
    handler modules are imported into this process)."""
    module = f"reload_handlers_{next(_modules)}"
    return module, write_organism(folder, organism_yaml(module), schemas={"item.xsd": ITEM_XSD},
                                  modules={module: handlers_source("one")})


class Watched:
    def __init__(self, folder: Path, module: str, pump: Pump, log: FileLog) -> None:
        self.folder = folder
        self.module = module
        self.pump = pump
        self.log = log
        self.results: asyncio.Queue[ReloadResult] = asyncio.Queue()

    def write(self, relative: str, text: str) -> None:
        path = self.folder / relative
        # Like an editor: write a new file, then rename it over the old one.
        temporary = path.with_name(path.name + ".swp")
        temporary.write_text(text)
        temporary.replace(path)

    async def edit(self, relative: str, text: str) -> ReloadResult:
        self.write(relative, text)
        return await asyncio.wait_for(self.results.get(), 30)

    def seen(self) -> list[Any]:
        return list(sys.modules[self.module].seen)

    async def events(self, kind: type[Any]) -> list[Any]:
        return [r.event async for r in self.log.read() if isinstance(r.event, kind)]


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[Watched]:
    module, path = new_organism(tmp_path / "org")
    log = await open_file_log(tmp_path / "events")
    async with open_pump(load_organism(path), log) as pump:
        w = Watched(tmp_path / "org", module, pump, log)
        stop = asyncio.Event()
        task = asyncio.ensure_future(watch(pump, stop=stop, debounce_ms=50,
                                           on_result=w.results.put_nowait))
        try:
            yield w
        finally:
            stop.set()
            await task
    await log.aclose()


def item(n: object) -> str:
    return f"<Item><n>{n}</n></Item>"


async def test_an_added_listener_receives_at_once(watched: Watched) -> None:
    result = await watched.edit("organism.yaml", organism_yaml(watched.module, extra=(
        f"""  - {{name: c, description: new, payload: schemas/item.xsd,
     handler: "{watched.module}:record"}}\n""")))
    assert (result.success, result.added, result.removed) == (True, ("c",), ())
    await watched.pump.inject(item(1), to="c")
    await watched.pump.wait_idle()
    assert watched.seen() == [("c", "1", "one")]
    reloaded = await watched.events(OrganismReloaded)
    assert [(e.added, e.removed) for e in reloaded] == [(("c",), ())]


async def test_a_removed_listener_has_its_queued_messages_dead_lettered(watched: Watched
                                                                      ) -> None:
    await watched.pump.pause("b", by="test")
    queued = [await watched.pump.inject(item(k), to="b") for k in range(3)]
    result = await watched.edit("organism.yaml", organism_yaml(watched.module, with_b=False))
    assert (result.success, result.removed) == (True, ("b",))
    await watched.pump.wait_idle()
    dead = await watched.events(MessageDeadLettered)
    assert [(d.message_id, d.reason) for d in dead] == [
        (q.message_id, "Listener 'b' was removed from the organism by a reload.")
        for q in queued]
    assert watched.seen() == []


async def test_a_tightened_schema_rejects_an_old_queued_message(watched: Watched) -> None:
    await watched.pump.pause("a", by="test")
    short = await watched.pump.inject(item("ok"), to="a")
    long = await watched.pump.inject(item("too long"), to="a")
    result = await watched.edit("schemas/item.xsd", TIGHT_XSD)
    assert result.success
    assert result.changes == {"a": ["schema_digest"], "b": ["schema_digest"]}
    await watched.pump.resume("a", by="test")
    await watched.pump.wait_idle()
    assert watched.seen() == [("a", "ok", "one")]
    dead = await watched.events(MessageDeadLettered)
    assert [d.message_id for d in dead] == [long.message_id]
    assert dead[0].reason.startswith("The message no longer fits a's new schema: The payload "
                                     "does not match item.xsd")
    assert short.message_id not in watched.pump.state.threads.dead_letters


async def test_a_broken_edit_is_refused_while_traffic_flows_then_a_fix_is_taken(
        watched: Watched) -> None:
    broken = organism_yaml(watched.module).replace("description: d", "descripton: d", 1)
    result = await watched.edit("organism.yaml", broken)
    assert result.success is False
    with pytest.raises(OrganismError) as check:  # the same message `check` prints
        load_organism(watched.folder / "organism.yaml")
    assert result.error == check.value.message
    assert f"{watched.folder / 'organism.yaml'}:3: Unknown key 'descripton' in listeners[0]." \
        in (result.error or "")
    rejected = await watched.events(ReloadRejected)
    assert [r.error for r in rejected] == [result.error]
    await watched.pump.inject(item(1), to="a")  # the old organism keeps running
    await watched.pump.wait_idle()
    assert watched.seen() == [("a", "1", "one")]
    fixed = await watched.edit("organism.yaml", organism_yaml(watched.module,
                                                             description="fixed"))
    assert (fixed.success, fixed.updated) == (True, ("a",))
    assert fixed.changes == {"a": ["description"]}
    assert watched.pump.organism.listeners["a"].description == "fixed"


async def test_edited_handler_code_is_picked_up(watched: Watched) -> None:
    result = await watched.edit(f"{watched.module}.py", handlers_source("two"))
    assert result.success
    assert result.changes == {"a": ["handler_code"], "b": ["handler_code"]}
    await watched.pump.inject(item(1), to="a")
    await watched.pump.wait_idle()
    assert watched.seen() == [("a", "1", "two")]


async def test_twenty_reloads_under_traffic_lose_nothing_and_deliver_nothing_twice(
        watched: Watched) -> None:
    injected: list[str] = []
    done = asyncio.Event()

    async def traffic() -> None:
        for k in itertools.count():
            if done.is_set():
                return
            accepted = await watched.pump.inject(item(k), to="a" if k % 2 else "b", wait=True)
            injected.append(accepted.message_id)
            await asyncio.sleep(0)

    producers = [asyncio.ensure_future(traffic()) for _ in range(4)]
    try:
        for round_ in range(20):
            result = await watched.edit("organism.yaml", organism_yaml(
                watched.module, description=f"round {round_}"))
            assert (result.success, result.updated) == (True, ("a",)), result
    finally:
        done.set()
        await asyncio.gather(*producers)
    await watched.pump.wait_idle()
    assert len(await watched.events(OrganismReloaded)) == 20
    accepted = [e.message_id for e in await watched.events(MessageAccepted)]
    delivered = Counter(e.message_id for e in await watched.events(MessageDelivered))
    handled = Counter(e.message_id for e in await watched.events(HandlerSucceeded))
    assert sorted(accepted) == sorted(injected)
    assert len(injected) > 20
    assert all(delivered[m] == 1 for m in accepted), "a message was delivered twice or never"
    assert all(handled[m] == 1 for m in accepted)
    assert len(watched.seen()) == len(injected)
    # The organism in force at every position is in the log: replay rebuilds the same state.
    replayed = await replay(watched.log)
    assert replayed.digest() == watched.pump.state.digest()
    assert replayed.agents.agents["a"].config["description"] == "round 19"


# ------------------------------------------------------------------ after a rejected reload


async def test_a_good_save_after_a_rejected_one_says_the_organism_is_good_again(
        watched: Watched, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xml_pipeline.runtime.reload")
    good = organism_yaml(watched.module)
    broken = good.replace("description: d", "descripton: d", 1)
    rejected = await watched.edit("organism.yaml", broken)
    assert rejected.success is False
    assert watched.pump.state.agents.last_reload_error == rejected.error
    # Undoing the typo gives the organism that kept running: nothing differs, but the
    # organism is good again, and that is said and recorded.
    undone = await watched.edit("organism.yaml", good)
    assert (undone.success, undone.recovered, undone.describe()) == (True, True, "no change")
    assert watched.pump.state.agents.last_reload_error is None
    await watched.edit("organism.yaml", broken)
    fixed = await watched.edit("organism.yaml", organism_yaml(watched.module,
                                                             description="fixed"))
    assert (fixed.recovered, fixed.describe()) == (True, "updated 'a' (description)")
    assert watched.pump.state.agents.last_reload_error is None
    said = [r.getMessage() for r in caplog.records if r.name == "xml_pipeline.runtime.reload"]
    assert said[1] == ("The organism is good again after the rejected reload: no change.")
    assert said[3] == ("The organism is good again after the rejected reload: "
                       "updated 'a' (description).")
    reloaded = await watched.events(OrganismReloaded)
    assert [(e.added, e.removed, e.changes) for e in reloaded] == [
        ((), (), {}), ((), (), {"a": ["description"]})]
    replayed = await replay(watched.log)
    assert replayed.digest() == watched.pump.state.digest()
    assert replayed.agents.last_reload_error is None


async def test_an_edit_that_changes_something_is_described(watched: Watched,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    caplog.set_level(logging.INFO, logger="xml_pipeline.runtime.reload")
    result = await watched.edit("organism.yaml", organism_yaml(
        watched.module, description="new", with_b=False, extra=(
            f"""  - {{name: c, description: new, payload: schemas/item.xsd,
     handler: "{watched.module}:record"}}\n""")))
    assert result.recovered is False
    said = [r.getMessage() for r in caplog.records if r.name == "xml_pipeline.runtime.reload"]
    assert said == ["Organism reloaded: added 'c'; removed 'b'; updated 'a' (description)."]


async def test_last_reload_error_is_cleared_by_a_good_reload_and_by_a_restart(
        tmp_path: Path) -> None:
    from tests.api_server import client, running_server

    module, path = new_organism(tmp_path / "org")
    good = path.read_text()
    broken = good.replace("description: d", "descripton: d", 1)
    async with running_server(load_organism(path), tmp_path / "events") as (base, _), \
            client(base) as http:
        path.write_text(broken)
        refused = (await http.post("/organism/reload")).json()
        assert (await http.get("/organism")).json()["last_reload_error"] == refused["error"]
        path.write_text(good.replace("description: d", "description: e", 1))
        assert (await http.post("/organism/reload")).status_code == 200
        seen = (await http.get("/organism")).json()
        assert (seen["last_reload_error"], seen["reloads_rejected"]) == (None, 1)
        path.write_text(broken)
        assert (await http.post("/organism/reload")).status_code == 422
    # A start loads and checks the same files: the organism on disk is good, the error gone.
    path.write_text(good)
    async with running_server(load_organism(path), tmp_path / "events") as (base, _), \
            client(base) as http:
        seen = (await http.get("/organism")).json()
        assert (seen["last_reload_error"], seen["reloads_rejected"]) == (None, 2)
        assert seen["loaded_at"] >= seen["started_at"]


async def test_loaded_at_is_when_this_process_put_the_organism_in_force(
        tmp_path: Path) -> None:
    ticks = itertools.count(1000)

    def clock() -> float:
        return float(next(ticks))

    module, path = new_organism(tmp_path / "org")
    log = await open_file_log(tmp_path / "events")
    try:
        for _start in range(2):  # the second start loads the same organism (same digest)
            async with open_pump(load_organism(path), log, clock=clock) as pump:
                agents = pump.state.agents
                assert agents.started_at is not None and agents.loaded_at is not None
                assert agents.loaded_at >= agents.started_at
                started = agents.started_at
            replayed = await replay(log)
            assert replayed.agents.loaded_at == started
    finally:
        await log.aclose()


# ------------------------------------------------------------------ what a reload changed


async def test_only_listeners_whose_handler_function_changed_are_marked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As for most users, bytecode is cached: edits of the same size in the same second
    # must still be picked up.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    module = f"reload_handlers_{next(_modules)}"

    def source(*, first: str, second: str, suffix: str, above: str = "") -> str:
        return (f'{above}SUFFIX = "{suffix}"\n\n\ndef _shout(text):\n'
                '    return text.upper() + SUFFIX\n\n\n'
                f'async def first(payload, ctx):\n    return "{first}"\n\n\n'
                f'async def second(payload, ctx):\n    return _shout("{second}")\n')

    path = write_organism(tmp_path / "org", f"""organism: {{name: code-test}}
listeners:
  - {{name: a, description: d, payload: schemas/item.xsd, handler: "{module}:first"}}
  - {{name: b, description: d, payload: schemas/item.xsd, handler: "{module}:second"}}
""", schemas={"item.xsd": ITEM_XSD}, modules={module: source(first="x", second="y",
                                                                 suffix="!")})
    handlers_file = path.parent / f"{module}.py"
    log = await open_file_log(tmp_path / "events")
    try:
        async with open_pump(load_organism(path), log) as pump:
            async def edit(text: str) -> dict[str, list[str]]:
                handlers_file.write_text(text)
                result = await reload_organism(pump)
                assert result.success, result.error
                return result.changes

            # Lines moved by a new function above: neither handler changed.
            assert await edit(source(first="x", second="y", suffix="!",
                                     above="async def unused(payload, ctx):\n    pass\n")
                              ) == {}
            assert await edit(source(first="x", second="z", suffix="!")) == {
                "b": ["handler_code"]}
            assert await edit(source(first="w", second="z", suffix="!")) == {
                "a": ["handler_code"]}
            # A helper or a constant the handler uses is part of its code.
            assert await edit(source(first="w", second="z", suffix="?")) == {
                "b": ["handler_code"]}
    finally:
        await log.aclose()


def test_a_reload_that_changes_nothing_says_no_change() -> None:
    assert ReloadResult(success=True).describe() == "no change"
    assert ReloadResult(success=True, settings=("api",), restart_needed=("api.port",)
                        ).describe() == "changed api (api.port takes effect after a restart)"
    assert ReloadResult(success=True, added=("c", "d"), removed=("b",), updated=("a",),
                        changes={"a": ["peers", "handler_code"]}).describe() == (
        "added 'c', 'd'; removed 'b'; updated 'a' (peers, handler_code)")


async def test_the_cli_says_no_change(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    from tests.api_server import running_server
    from xml_pipeline.cli import main

    module, path = new_organism(tmp_path / "org")
    async with running_server(load_organism(path), tmp_path / "events") as (base, _):
        code = await asyncio.to_thread(main, ["reload", "--url", base])
        assert (code, capsys.readouterr().out) == (0, "reloaded: no change\n")
        # No listener changed, but the organism did: that is not "no change".
        path.write_text(path.read_text().replace(
            "organism: {name: reload-test}",
            "organism: {name: reload-test, budgets: {thread_tokens: 5000}}"))
        code = await asyncio.to_thread(main, ["reload", "--url", base])
        assert (code, capsys.readouterr().out) == (
            0, "reloaded: added none, removed none, updated none, changed budgets\n")


# ------------------------------------------------------------------ listeners that come back


async def test_a_paused_listener_removed_and_added_back_runs(tmp_path: Path) -> None:
    module, path = new_organism(tmp_path / "org")
    log = await open_file_log(tmp_path / "events")
    try:
        async with open_pump(load_organism(path), log) as pump:
            await pump.pause("b", by="test")
            path.write_text(organism_yaml(module, with_b=False))
            assert (await reload_organism(pump)).removed == ("b",)
            path.write_text(organism_yaml(module))
            assert (await reload_organism(pump)).added == ("b",)
            b = pump.state.agents.agents["b"]
            assert (b.status, b.paused_by, b.paused_at) == ("running", None, None)
            await pump.inject(item(1), to="b")
            await pump.wait_idle()
            assert pump.state.agents.agents["b"].succeeded == 1
        replayed = (await replay(log)).agents.agents["b"]
        assert (replayed.status, replayed.paused_by, replayed.paused_at) == (
            "running", None, None)
    finally:
        await log.aclose()


def test_the_reload_doc_gives_the_debounce_of_the_code() -> None:
    from tests.conftest import ROOT
    from xml_pipeline.runtime.reload import DEBOUNCE_MS

    text = (ROOT / "docs" / "reload.md").read_text()
    figures = {int(n) for sentence in re.split(r"(?<=\.)\s", text) if "debounc" in sentence
               for n in re.findall(r"(\d+) ms", sentence)}
    assert figures == {DEBOUNCE_MS}

"""The reference documents say what the code does: the event list, the command list, the
WebSocket close codes and the route list are checked against the code they describe.

Each check parses one section of a document (a table or a command block found by its heading),
so a new event, flag or route fails here until it is documented, and a removed one fails until
its stale entry goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

import pytest
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.api_server import running_server
from tests.conftest import ROOT
from xml_pipeline import cli
from xml_pipeline.api.app import create_app
from xml_pipeline.api.stream import websocket
from xml_pipeline.config import load_organism
from xml_pipeline.events import CATALOGUE

API_MD = ROOT / "docs" / "api.md"
AGENTSERVER_MD = ROOT / "docs" / "agentserver.md"
README = ROOT / "README.md"


# ------------------------------------------------------------------ reading documents


def section(path: Path, heading: str) -> str:
    """The text under the Markdown ``heading`` (exact line, e.g. ``## Endpoints``), up to the
    next heading of the same or a higher level."""
    lines = path.read_text().splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    starts = [i for i, line in enumerate(lines) if line.strip() == heading]
    assert len(starts) == 1, f"{path.name} needs exactly one heading {heading!r}."
    body: list[str] = []
    fenced = False
    for line in lines[starts[0] + 1:]:
        if line.startswith("```"):
            fenced = not fenced
        match = re.match(r"(#+) ", line)
        if not fenced and match and len(match.group(1)) <= level:
            break
        body.append(line)
    return "\n".join(body)


def first_cells(text: str) -> list[str]:
    """The first cell of every body row of the Markdown tables in ``text``."""
    cells = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells.append(line.split("|")[1].strip())
    return cells


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("|") and not set(line) <= set("|- ")]


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text``: its header row, then its body rows."""
    found: list[list[list[str]]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                found.append([])
            if not set(line) <= set("|- "):
                found[-1].append([cell.strip() for cell in line.split("|")[1:-1]])
        previous = line
    return found


def sh_block(text: str) -> list[str]:
    """The lines of the first ```sh block in ``text``, continuation lines (``\\``) joined."""
    match = re.search(r"```sh\n(.*?)\n```", text, re.S)
    assert match, "The section has no ```sh block."
    return match.group(1).replace("\\\n", " ").splitlines()


# ------------------------------------------------------------------ events


def test_the_event_list_is_the_catalogue() -> None:
    listed = [cell.strip("`") for cell in first_cells(section(API_MD, "### Event types"))
              if re.fullmatch(r"`\w+`", cell)]
    assert len(listed) == len(set(listed)), "docs/api.md lists an event type twice."
    missing = sorted(set(CATALOGUE) - set(listed))
    stale = sorted(set(listed) - set(CATALOGUE))
    assert (missing, stale) == ([], []), (
        f"docs/api.md's event list (### Event types) lacks {missing} and names {stale}, which "
        f"xml_pipeline/events.py's CATALOGUE does not have: document the new events there.")


# ------------------------------------------------------------------ the command line


def commands() -> dict[str, set[str]]:
    """Every subcommand of ``xml-pipeline`` with its long options (``--help`` aside)."""
    parser = cli._parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1
    return {name: {option for action in sub._actions for option in action.option_strings
                   if option.startswith("--") and not isinstance(action, argparse._HelpAction)}
            for name, sub in subparsers[0].choices.items()}


def documented_commands() -> dict[str, set[str]]:
    """The README's command list: one ``xml-pipeline COMMAND [options]  # comment`` entry per
    command; the options are the ``--long`` names written in it."""
    documented: dict[str, set[str]] = {}
    for line in sh_block(section(README, "## Commands")):
        words = line.split("#")[0].split()
        if not words:
            continue
        assert words[0] == "xml-pipeline" and len(words) > 1, (
            f"README.md's command list has a line that is not a command: {line!r}.")
        assert words[1] not in documented, f"README.md lists {words[1]!r} twice."
        documented[words[1]] = set(re.findall(r"--[a-z][a-z-]*", " ".join(words[2:])))
    return documented


def test_the_readme_lists_every_command_and_option() -> None:
    actual, documented = commands(), documented_commands()
    assert sorted(documented) == sorted(actual), (
        f"README.md's command list (## Commands) has {sorted(documented)}; the parser in "
        f"xml_pipeline/cli/__init__.py has {sorted(actual)}.")
    for name, options in actual.items():
        assert documented[name] == options, (
            f"README.md documents `xml-pipeline {name}` with {sorted(documented[name])}; the "
            f"parser gives it {sorted(options)}.")


# ------------------------------------------------------------------ the WebSocket


def documented_close_codes() -> dict[int, str]:
    """The ``close code | when | ...`` table of the WebSocket section: code -> when."""
    codes = {}
    for row in table_rows(section(API_MD, "### `WS /ws` (WebSocket)")):
        match = re.match(r"`(\d{4})`", row[0])
        if match:
            codes[int(match.group(1))] = row[1]
    return codes


def test_the_documented_close_codes_are_the_servers() -> None:
    codes = documented_close_codes()
    assert sorted(codes) == sorted({websocket.LAGGING_CLOSE_CODE, websocket.SHUTDOWN_CLOSE_CODE,
                                    websocket.DAMAGED_CLOSE_CODE})
    assert "lagging" in codes[websocket.LAGGING_CLOSE_CODE]
    assert "damaged" in codes[websocket.DAMAGED_CLOSE_CODE]
    assert "shut" in codes[websocket.SHUTDOWN_CLOSE_CODE]


async def closing_code(ws: ClientConnection) -> int | None:
    """Read ``ws`` until the server closes it; the code it closed with."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def test_a_websocket_open_at_shutdown_closes_with_the_documented_code(
        tmp_path: Path) -> None:
    organism = load_organism(ROOT / "organism.yaml")
    async with running_server(organism, tmp_path / "events") as (base, _):
        ws = await connect(base.replace("http", "ws", 1) + "/api/v1/ws")
        await ws.send(json.dumps({"subscribe": {"after": 0}}))
        assert "subscribed" in json.loads(await ws.recv())
        code = asyncio.ensure_future(closing_code(ws))
    # Leaving running_server shut the server down, as SIGTERM or POST /organism/stop do.
    assert await code == websocket.SHUTDOWN_CLOSE_CODE
    assert websocket.SHUTDOWN_CLOSE_CODE in documented_close_codes()


# ------------------------------------------------------------------ routes


def routes(items: list[BaseRoute], prefix: str = "") -> set[str]:
    found: set[str] = set()
    for route in items:
        if isinstance(route, Mount):
            found |= routes(list(route.routes), prefix + route.path)
        elif isinstance(route, WebSocketRoute):
            found.add(f"WS {prefix}{route.path}")
        elif isinstance(route, Route):
            found |= {f"{method} {prefix}{route.path}"
                      for method in route.methods or () if method != "HEAD"}
        else:
            raise AssertionError(f"No rule to document the route {route!r}.")
    return found


ROUTE = re.compile(r"`(GET|POST|PUT|PATCH|DELETE|WS) (/\S*)`")


def served(tmp_path: Path) -> set[str]:
    """``METHOD /path`` of every route the application serves."""
    app = create_app(load_organism(ROOT / "organism.yaml"), data=tmp_path / "events")
    return routes(list(app.routes))


def test_every_route_is_in_the_endpoint_table(tmp_path: Path) -> None:
    actual = served(tmp_path)
    listed = [cell.strip("`") for cell in first_cells(section(API_MD, "## Endpoints"))
              if re.fullmatch(r"`(GET|POST|PUT|PATCH|DELETE|WS) /\S*`", cell)]
    assert len(listed) == len(set(listed)), "docs/api.md's endpoint table lists a route twice."
    missing = sorted(actual - set(listed))
    stale = sorted(set(listed) - actual)
    assert (missing, stale) == ([], []), (
        f"docs/api.md's endpoint table (## Endpoints) lacks {missing} and lists {stale}, which "
        f"the application does not serve: document the new routes there.")


def test_the_agentserver_guide_maps_every_route(tmp_path: Path) -> None:
    """docs/agentserver.md's route tables (``| AgentServer | here | what differs |``) name, in
    their "here" column, each served route once, relative to /api/v1 as in docs/api.md."""
    listed: list[str] = []
    for table in tables(AGENTSERVER_MD.read_text()):
        if table and table[0] == ["AgentServer", "here", "what differs"]:
            for row in table[1:]:
                for method, path in ROUTE.findall(row[1]):
                    full = path if path.startswith(("/health", "/metrics")) else "/api/v1" + path
                    listed.append(f"{method} {full}")
    assert len(listed) == len(set(listed)), "docs/agentserver.md maps a route twice."
    actual = served(tmp_path)
    missing = sorted(actual - set(listed))
    stale = sorted(set(listed) - actual)
    assert "docs/agentserver.md" in section(README, "## Documentation")
    assert "[docs/agentserver.md](agentserver.md)" in API_MD.read_text()
    assert (missing, stale) == ([], []), (
        f"docs/agentserver.md's route tables lack {missing} and name {stale}, which the "
        f"application does not serve: say what each route is in AgentServer's terms.")

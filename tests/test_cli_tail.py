"""``xml-pipeline tail`` and the CLI's own words: ``-n N``, refused values, ``--url`` forms, and
following a running organism across a restart."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from tests.test_api_stream import damaged_log
from tests.test_cli_log import EVENTS, data, run, tail_json
from xml_pipeline.cli import main
from xml_pipeline.config import load_organism

__all__ = ["data"]  # the fixture, shared with the log's CLI tests

ROOT = Path(__file__).resolve().parent.parent


def test_tail_n_prints_the_last_records(data: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    positions = [line["position"] for line in tail_json(capsys, data, "-n", "3")]
    assert positions == [len(EVENTS) - 2, len(EVENTS) - 1, len(EVENTS)]
    everything = tail_json(capsys, data, "-n", str(len(EVENTS) + 50))
    assert [line["position"] for line in everything] == list(range(1, len(EVENTS) + 1))


@pytest.mark.parametrize(("argv", "complaint"), [
    (["tail", "--after", "-5"], "argument --after: must be a whole number of 0 or more, not -5"),
    (["tail", "-n", "0"], "argument -n/--lines: must be a whole number of 1 or more, not 0"),
    (["tail", "-n", "2", "--after", "3"], "argument --after: not allowed with argument -n/--lines"),
    (["threads", "--limit", "0"], "argument --limit: must be a whole number from 1 to 1000, "
                                  "not 0"),
    (["dead-letters", "--limit", "x"], "argument --limit: must be a whole number from 1 to "
                                       "1000, not 'x'"),
    (["usage", "--threads", "5000"], "argument --threads: must be a whole number from 1 to "
                                     "1000, not 5000"),
])
def test_bad_values_are_refused_in_the_clis_words(argv: list[str], complaint: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(complaint)


def test_unknown_type_is_refused_before_reaching_the_organism(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "tail", "--url", "http://127.0.0.1:9", "--type", "Bogus")
    assert code == 2
    assert err.startswith("Unknown event type(s): Bogus. Known: ")
    assert "details.valid_types" not in err


@pytest.mark.parametrize(("url", "complaint"), [
    ("ftp://127.0.0.1:1", "--url: The organism's address must start with http:// or https://, "
                          "not ftp://; for example http://127.0.0.1:8765."),
    ("127.0.0.1:port", "--url: The port of 'http://127.0.0.1:port' is not a number from 0 to "
                       "65535; for example http://127.0.0.1:8765."),
    ("http://127.0.0.1:1/api/v1", "--url: Give the organism's address without a path "
                                  "(http://127.0.0.1:1), not 'http://127.0.0.1:1/api/v1': "
                                  "commands add /api/v1 themselves."),
])
def test_a_url_that_cannot_work_says_what_is_wrong(url: str, complaint: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "threads", "--url", url)
    assert (code, err) == (2, f"xml-pipeline threads: {complaint}\n")


# ------------------------------------------------------------------ following over the API


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_server(port: int, data: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xml_pipeline", "run", "organism.yaml", "--data", str(data),
        "--port", str(port), "--no-watch", "--no-access-log", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    async for line in process.stdout:
        if b"Uvicorn running on" in line:
            return process
    raise AssertionError("the organism did not start")


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    await process.communicate()


async def inject(port: int, name: str) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/api/v1") as http:
        answer = await http.post("/inject", json={"to": "greeter",
                                                  "payload": f"<Greeting><name>{name}</name>"
                                                             "</Greeting>"})
        assert answer.status_code == 202
        message_id: str = answer.json()["message_id"]
        return message_id


async def tail_process(port: int, *flags: str) -> asyncio.subprocess.Process:
    # The address without a scheme, as people type it.
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xml_pipeline", "tail", "--url", f"127.0.0.1:{port}", "--json",
        "--type", "MessageAccepted", *flags, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def next_line(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    return (await stream.readline()).decode()


async def test_tail_url_reconnects_from_its_last_position(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "events"
    server = await start_server(port, data)
    tail = await tail_process(port, "--after", "0")
    try:
        first = await inject(port, "one")
        lines = [json.loads(await next_line(tail.stdout))]
        assert lines[0]["data"]["message_id"] == first
        await stop(server)
        notice = await next_line(tail.stderr)
        resume = int(notice.rsplit("after #", 1)[1].split(" ", 1)[0])
        assert notice.endswith(f"; reconnecting to resume after #{resume} (Ctrl-C to stop).\n")
        # Stdout is flushed before the notice: what it printed ends at the resume position.
        while lines[-1]["position"] != resume:
            lines.append(json.loads(await next_line(tail.stdout)))
        server = await start_server(port, data)
        assert await next_line(tail.stderr) == (f"Reconnected to http://127.0.0.1:{port}; "
                                                f"resuming after #{resume}.\n")
        second = await inject(port, "two")
        while lines[-1]["data"]["message_id"] != second:
            lines.append(json.loads(await next_line(tail.stdout)))
        # Nothing printed twice, nothing missed.
        positions = [line["position"] for line in lines]
        assert positions == sorted(set(positions))
    finally:
        tail.send_signal(signal.SIGINT)
        await tail.communicate()
        await stop(server)
    assert tail.returncode == 130


async def test_tail_url_no_follow_exits_1_when_the_organism_stops(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "events"
    server = await start_server(port, data)
    tail = await tail_process(port, "--no-follow", "--after", "0")
    try:
        message_id = await inject(port, "one")
        assert json.loads(await next_line(tail.stdout))["data"]["message_id"] == message_id
    finally:
        await stop(server)
    _, err = await tail.communicate()
    assert tail.returncode == 1
    assert err.decode().endswith("; not reconnecting (--no-follow).\n")


async def test_tail_url_stops_with_exit_1_where_the_log_is_damaged(tmp_path: Path) -> None:
    # Reconnecting would reach the same damage again: it says where, and stops.
    good = await damaged_log(tmp_path, load_organism(ROOT / "organism.yaml"), to="greeter",
                             payload=lambda n: f"<Greeting><name>n{n}</name></Greeting>")
    port = free_port()
    server = await start_server(port, tmp_path / "events")
    try:
        tail = await tail_process(port, "--after", "0")
        out, err = await tail.communicate()
    finally:
        await stop(server)
    assert tail.returncode == 1
    printed = [json.loads(line)["position"] for line in out.decode().splitlines()]
    assert printed and max(printed) <= good
    assert err.decode().startswith(f"The log is damaged at position {good + 1} (")
    assert err.decode().endswith(f" (the stream stopped after #{good})\n")


@pytest.mark.parametrize(("argv", "complaint"), [
    (["inject", "--to", "greeter", " "], "xml-pipeline inject: the payload is empty: give XML "
                                         "text, @FILE, or - to read standard input.\n"),
    (["inject", "--to", "greeter", "--idempotency-key", "", "<Greeting/>"],
     "xml-pipeline inject: --idempotency-key must not be empty (leave it out for none).\n"),
])
def test_inject_refuses_what_the_api_would_call_an_invalid_json_body(
        argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *argv, "--url", "http://127.0.0.1:9")
    assert (code, err) == (2, complaint)

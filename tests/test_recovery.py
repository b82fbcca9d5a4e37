"""Crash recovery: SIGKILL a running organism mid-traffic, restart it on the same log.

Every message whose id was returned to the client is found accepted in the log, handled at
least once, in the thread the client was told; and the live state after recovery equals the
state rebuilt by replay."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import write_organism
from xml_pipeline.events import HandlerSucceeded, MessageAccepted
from xml_pipeline.log.file import open_file_log, verify_log
from xml_pipeline.state import replay

ITEM_XSD = """<?xml version="1.0"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Item"><xs:complexType><xs:sequence>
    <xs:element name="n" type="xs:string"/>
  </xs:sequence></xs:complexType></xs:element>
</xs:schema>
"""

HANDLERS = """
import asyncio, random

async def hop1(payload, ctx):
    await asyncio.sleep(random.random() / 500)
    await ctx.send("hop2", payload)

async def hop2(payload, ctx):
    await asyncio.sleep(random.random() / 500)
    await ctx.send("hop3", payload)

async def hop3(payload, ctx):
    await asyncio.sleep(random.random() / 500)
"""

ORGANISM = """
organism: {name: crash, log: {path: events, fsync: batch}}
listeners:
  - {name: hop1, description: d, payload: schemas/item.xsd, handler: "crash_handlers:hop1",
     peers: [hop2], concurrency: 4}
  - {name: hop2, description: d, payload: schemas/item.xsd, handler: "crash_handlers:hop2",
     peers: [hop3], concurrency: 4}
  - {name: hop3, description: d, payload: schemas/item.xsd, handler: "crash_handlers:hop3",
     concurrency: 4}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(path: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "xml_pipeline", "run", str(path), "--port", str(port),
         "--no-access-log"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=path.parent,
    )
    assert process.stdout is not None
    seen = b""
    for line in process.stdout:  # serving once uvicorn says so
        seen += line
        if b"Uvicorn running on" in line:
            return process
    raise AssertionError(f"the organism did not start:\n{seen.decode()}")


async def request(base: str, message: dict[str, str]) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        response = await http.post("/api/v1/inject", json=message)
        answer: dict[str, str] = response.json()
        answer["ok"] = response.status_code == 202  # type: ignore[assignment]
        return answer


async def inject_until_killed(base: str, process: subprocess.Popen[bytes], rounds: int,
                              rng: random.Random) -> dict[str, tuple[str, str]]:
    """Eight clients inject steadily; once a random number of injections were acknowledged,
    SIGKILL the process while the others are in flight. Returns acked id -> (n, thread)."""
    acked: dict[str, tuple[str, str]] = {}
    threshold = rng.randint(1, 80)
    killed = asyncio.Event()
    counter = iter(range(1_000_000))

    async def client() -> None:
        while not killed.is_set():
            n = f"{rounds}-{next(counter)}"
            try:
                answer = await request(base, {"to": "hop1",
                                              "payload": f"<Item><n>{n}</n></Item>"})
            except (httpx.TransportError, ValueError):
                return
            if answer.get("ok"):
                acked[answer["message_id"]] = (n, answer["thread_id"])
            if len(acked) >= threshold and not killed.is_set():
                os.kill(process.pid, signal.SIGKILL)
                killed.set()

    await asyncio.gather(*(client() for _ in range(8)))
    process.wait()
    return acked


async def test_sigkill_mid_traffic_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = write_organism(tmp_path / "org", ORGANISM, schemas={"item.xsd": ITEM_XSD},
                          modules={"crash_handlers": HANDLERS})
    data = tmp_path / "org" / "events"
    rng = random.Random(1234)
    acked: dict[str, tuple[str, str]] = {}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    for rounds in range(4):
        process = start(path, port)
        try:
            acked.update(await inject_until_killed(base, process, rounds, rng))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert acked, "no injection was acknowledged before the kills"
    process = start(path, port)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            status = (await http.get("/api/v1/organism/state")).json()  # answers once idle
        assert status["idle"] is True
        assert verify_log(data).ok
        log = await open_file_log(data, readonly=True)
        accepted = {}
        handled: dict[str, int] = {}
        async for record in log.read():
            event = record.event
            if isinstance(event, MessageAccepted):
                accepted[event.message_id] = event
            elif isinstance(event, HandlerSucceeded):
                handled[event.message_id] = handled.get(event.message_id, 0) + 1
        replayed = await replay(log)
        await log.aclose()
        for message_id, (n, thread_id) in acked.items():
            event = accepted[message_id]
            assert event.thread_id == thread_id
            assert f"<n>{n}</n>" in event.envelope
            assert handled.get(message_id, 0) >= 1
            # the whole conversation completed, in the same thread, carrying the same n
            hops = [e for e in accepted.values() if e.thread_id == thread_id]
            # a redelivered handler's sends are not repeated: one message per hop
            assert sorted(e.to for e in hops) == ["hop1", "hop2", "hop3"]
            assert all(f"<n>{n}</n>" in e.envelope for e in hops)
            assert all(handled.get(e.message_id, 0) >= 1 for e in hops)
        assert replayed.position == status["position"]
        assert replayed.digest() == status["digest"]
    finally:
        process.send_signal(signal.SIGTERM)
        out = process.communicate(timeout=30)[0]
    assert process.returncode == 0, out

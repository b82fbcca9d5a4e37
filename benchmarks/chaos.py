"""Crash loop: SIGKILL a loaded organism at random moments, restart it on the same log, check.

    python benchmarks/chaos.py [--rounds 20] [--seed 1] [--clients 8] [--max-acks 1000]
                               [--dir PATH]

A three-hop chain (hop1 -> hop2 -> hop3, each handler sleeping 0-2 ms, concurrency 4) runs as
``xml-pipeline run`` in a child process. Several HTTP clients inject into it back to back, each
message carrying a unique marker ``<n>`` and an idempotency key. Each round the process is
SIGKILLed once a random number of injections (0 to ``--max-acks``) were acknowledged in that
round, while the other clients' requests and the chain's hops are in flight (0 means at once,
while the backlog of the previous crash is being redelivered; one round in twelve is killed
earlier still, while the process starts and replays the log), then it is restarted on the same
log. A request that got no answer is sent again, with the same key, in the next round, as a
careful client would. After the last round the organism is started once more, every unanswered
injection is sent again, 50 injections acknowledged by earlier processes are sent again too, and
the log is checked:

- every acknowledged message is in the log once, under the id and thread the client was told;
  no other ``MessageAccepted`` carries its marker, and every answer to its key gave the same
  ids (the idempotency key held across crashes);
- its whole conversation (hop1, hop2, hop3) is accepted once per hop and handled at least once,
  all in that thread with that marker (a redelivered handler's sends are not repeated);
- every delivery beyond the first of a message is flagged as a redelivery;
- the hash chain verifies and the live state digest equals the digest of a replay.

It prints the counts, the deliveries repeated after crashes (allowed: at-least-once), the
messages lost (must be 0), and the time from process start to serving per restart, with a
RAW BASELINE for the latter: the same interpreter starting uvicorn with an empty Starlette app.
Exits 1 if anything is lost or wrong. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import textwrap
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from xml_pipeline.events import (
    HandlerSucceeded,
    MessageAccepted,
    MessageDelivered,
    OrganismStarted,
)
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
organism: {name: chaos, log: {path: events, fsync: batch}}
listeners:
  - {name: hop1, description: d, payload: schemas/item.xsd, handler: "chaos_handlers:hop1",
     peers: [hop2], concurrency: 4}
  - {name: hop2, description: d, payload: schemas/item.xsd, handler: "chaos_handlers:hop2",
     peers: [hop3], concurrency: 4}
  - {name: hop3, description: d, payload: schemas/item.xsd, handler: "chaos_handlers:hop3",
     concurrency: 4}
"""

HOPS = ["hop1", "hop2", "hop3"]
SERVING = b"Uvicorn running on"
START_TIMEOUT = 60.0  # seconds; a bound against a hang, not a synchronisation

BASELINE_APP = """
import sys, uvicorn
from starlette.applications import Starlette
uvicorn.run(Starlette(), host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""


def write_organism(folder: Path) -> Path:
    """The three-hop organism in ``folder``; returns its organism.yaml."""
    (folder / "schemas").mkdir(parents=True, exist_ok=True)
    (folder / "schemas" / "item.xsd").write_text(ITEM_XSD)
    (folder / "chaos_handlers.py").write_text(textwrap.dedent(HANDLERS))
    path = folder / "organism.yaml"
    path.write_text(textwrap.dedent(ORGANISM))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ the process


@dataclass
class Server:
    process: asyncio.subprocess.Process
    started_in: float  # seconds from spawning the process to uvicorn serving
    output: deque[bytes]

    async def drain(self) -> None:
        """Read the output to the end, so that the child never blocks on a full pipe."""
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.output.append(line)

    def kill(self) -> None:
        # Already reaped (returncode is set a moment later) once SIGKILL was sent before.
        with suppress(ProcessLookupError):
            if self.process.returncode is None:
                os.kill(self.process.pid, signal.SIGKILL)


async def spawn(arguments: list[str], *, cwd: Path, until: bytes = SERVING) -> Server:
    """Start ``python arguments...`` and return once it prints a line containing ``until``
    (by default: uvicorn is serving)."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, *arguments, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    output: deque[bytes] = deque(maxlen=200)
    try:
        async with asyncio.timeout(START_TIMEOUT):
            async for line in process.stdout:
                output.append(line)
                if until in line:
                    return Server(process, time.perf_counter() - started, output)
            await process.wait()
        problem = "exited"
    except TimeoutError:
        process.kill()
        await process.wait()
        problem = f"was still starting after {START_TIMEOUT} s"
    raise RuntimeError(f"the process {problem} before printing {until!r}:\n"
                       + b"".join(output).decode(errors="replace"))


async def start_organism(path: Path, port: int, *, until: bytes = SERVING) -> Server:
    return await spawn(["-m", "xml_pipeline", "run", str(path), "--port", str(port),
                        "--no-access-log"], cwd=path.parent, until=until)


async def baseline_start_times(port: int, count: int, *, cwd: Path) -> list[float]:
    """RAW BASELINE: process start to serving for uvicorn with an empty app, same interpreter."""
    times = []
    for _ in range(count):
        server = await spawn(["-c", BASELINE_APP, str(port)], cwd=cwd)
        server.kill()
        await server.process.communicate()
        times.append(server.started_in)
    return times


# ------------------------------------------------------------------ the load


@dataclass
class Injection:
    marker: str  # the payload's <n>, unique per injection
    key: str  # its idempotency key, the same on every attempt
    message_id: str | None = None  # from the first 202
    thread_id: str | None = None
    attempts: int = 0
    answered_by: int | None = None  # pid of the process that first answered 202
    answers: list[tuple[str, str]] = field(default_factory=list)  # every 202's ids


class Load:
    """Clients that inject back to back; remembers every injection and every answer."""

    def __init__(self, *, clients: int) -> None:
        self.clients = clients
        self.injections: list[Injection] = []
        self.unanswered: deque[Injection] = deque()  # sent again, same key, first
        self.refused: Counter[int] = Counter()  # non-202 status codes
        self.pid = 0  # of the process the clients talk to

    def _next(self) -> Injection:
        if self.unanswered:
            return self.unanswered.popleft()
        number = len(self.injections)
        injection = Injection(marker=f"m{number}", key=f"chaos-{number}")
        self.injections.append(injection)
        return injection

    async def _send(self, http: httpx.AsyncClient, injection: Injection) -> bool:
        """One attempt; True if acknowledged. Raises ``httpx.TransportError``."""
        injection.attempts += 1
        response = await http.post("/api/v1/inject", json={
            "to": "hop1", "payload": f"<Item><n>{injection.marker}</n></Item>",
            "idempotency_key": injection.key})
        if response.status_code != 202:
            self.refused[response.status_code] += 1
            return False
        answer = response.json()
        ids = (answer["message_id"], answer["thread_id"])
        injection.answers.append(ids)
        if injection.message_id is None:
            injection.message_id, injection.thread_id = ids
            injection.answered_by = self.pid
        return True

    async def run_until(self, base: str, acks: int, crash: Callable[[], None]) -> int:
        """Inject from every client until ``acks`` were acknowledged, then call ``crash`` and
        go on until the connection breaks. Returns the number acknowledged."""
        done = 0
        crashed = False

        async def client() -> None:
            nonlocal done, crashed
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                while True:
                    if done >= acks and not crashed:
                        crashed = True
                        crash()
                    injection = self._next()
                    try:
                        acknowledged = await self._send(http, injection)
                    except httpx.TransportError:
                        self.unanswered.append(injection)
                        return
                    if acknowledged:
                        done += 1
                    else:
                        self.unanswered.append(injection)
                        await asyncio.sleep(0.01)  # back off on 429/503, not a synchronisation

        async with asyncio.TaskGroup() as tasks:
            for _ in range(self.clients):
                tasks.create_task(client())
        return done

    async def settle(self, base: str) -> None:
        """Send every unanswered injection again until each is acknowledged."""
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            while self.unanswered:
                injection = self.unanswered.popleft()
                if not await self._send(http, injection):
                    self.unanswered.append(injection)
                    await asyncio.sleep(0.01)

    async def repeat(self, base: str, injections: list[Injection]) -> None:
        """Send acknowledged injections again with their keys (not counted as attempts); each
        answer is kept, to be compared with the first."""
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for injection in injections:
                attempts = injection.attempts
                while not await self._send(http, injection):
                    await asyncio.sleep(0.01)
                injection.attempts = attempts


# ------------------------------------------------------------------ the check


@dataclass
class Report:
    rounds: int = 0
    injections: int = 0  # distinct injections attempted
    acknowledged: int = 0  # distinct injections answered 202
    resent: int = 0  # attempts beyond the first (no answer before a crash)
    kept_by_key: int = 0  # resent, and answered with a message accepted before that crash
    repeated: int = 0  # acknowledged before the last start, sent again after it
    accepted: int = 0  # MessageAccepted from the API (hop1)
    hops_accepted: int = 0  # MessageAccepted, all hops
    hops_handled: int = 0  # distinct messages with a HandlerSucceeded
    deliveries: int = 0  # MessageDelivered, all
    duplicates: int = 0  # deliveries beyond the first per message
    records: int = 0  # log records
    refused: dict[int, int] = field(default_factory=dict)  # answers other than 202, by status
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    startup_kills: int = 0  # rounds killed while starting (replaying), before serving
    spawned: list[int] = field(default_factory=list)  # pid of every start, in order
    served: list[int] = field(default_factory=list)  # pid of every start that served
    restart_seconds: list[float] = field(default_factory=list)
    baseline_seconds: list[float] = field(default_factory=list)
    live: dict[str, object] = field(default_factory=dict)
    replayed: tuple[int, str] = (0, "")

    @property
    def ok(self) -> bool:
        return not self.lost and not self.wrong


def marker_of(envelope: str) -> str | None:
    start = envelope.find("<n>")
    return None if start < 0 else envelope[start + 3:envelope.find("</n>", start)]


async def check(data: Path, load: Load, live: dict[str, object], report: Report) -> None:
    """Compare what the clients were told with the log in ``data`` (read-only) and the live
    state ``live`` (``GET /organism/state``) with a replay. Fills ``report``."""
    verified = verify_log(data)
    if not verified.ok:
        report.wrong.append(f"the hash chain does not verify: {verified}")
    log = await open_file_log(data, readonly=True)
    try:
        accepted: dict[str, MessageAccepted] = {}
        positions: dict[str, int] = {}  # message id -> position of its MessageAccepted
        started_at: dict[int, int] = {}  # pid -> position of its OrganismStarted
        by_marker: dict[str, list[MessageAccepted]] = {}
        by_thread: dict[str, list[MessageAccepted]] = {}
        handled: Counter[str] = Counter()
        delivered: dict[str, list[MessageDelivered]] = {}
        async for record in log.read():
            report.records += 1
            event = record.event
            if isinstance(event, MessageAccepted):
                if event.message_id in accepted:
                    report.wrong.append(f"message {event.message_id} accepted twice")
                accepted[event.message_id] = event
                positions[event.message_id] = record.position
                by_thread.setdefault(event.thread_id, []).append(event)
                marker = marker_of(event.envelope)
                if marker is not None:
                    by_marker.setdefault(marker, []).append(event)
            elif isinstance(event, HandlerSucceeded):
                handled[event.message_id] += 1
            elif isinstance(event, MessageDelivered):
                delivered.setdefault(event.message_id, []).append(event)
            elif isinstance(event, OrganismStarted):
                started_at[event.pid] = record.position
        replayed = await replay(log)
    finally:
        await log.aclose()

    report.live = live
    report.replayed = (replayed.position, replayed.digest())
    report.injections = len(load.injections)
    report.resent = sum(i.attempts - 1 for i in load.injections)
    report.refused = dict(load.refused)
    report.accepted = sum(1 for e in accepted.values() if e.sender == "api")
    report.hops_accepted = len(accepted)
    report.hops_handled = len(handled)
    report.deliveries = sum(len(d) for d in delivered.values())
    report.duplicates = report.deliveries - len(delivered)
    for message_id, deliveries in delivered.items():
        if not all(d.redelivery for d in deliveries[1:]):
            report.wrong.append(f"message {message_id} delivered again without the "
                                "redelivery flag")
    # Every process that served recorded its start first; one killed while starting may have.
    logged = list(started_at)
    if ([pid for pid in logged if pid in report.served] != report.served
            or not set(logged) <= set(report.spawned)):
        report.wrong.append(f"the log holds starts of processes {logged}; served: "
                            f"{report.served}, spawned: {report.spawned}")
    for injection in load.injections:
        if injection.message_id is None:
            continue
        report.acknowledged += 1
        _check_injection(injection, accepted, by_marker, by_thread, handled, report)
        answered_at = started_at.get(injection.answered_by or 0)
        if (injection.attempts > 1 and answered_at is not None
                and positions.get(injection.message_id, 0) < answered_at):
            report.kept_by_key += 1
    if report.accepted != report.acknowledged:
        report.wrong.append(f"{report.accepted} messages accepted from the API, "
                            f"{report.acknowledged} acknowledged")
    if live.get("idle") is not True:
        report.wrong.append("the organism did not become idle")
    if (live.get("position"), live.get("digest")) != report.replayed:
        report.wrong.append(f"live state {live} differs from the replay {report.replayed}")


def _check_injection(injection: Injection, accepted: dict[str, MessageAccepted],
                     by_marker: dict[str, list[MessageAccepted]],
                     by_thread: dict[str, list[MessageAccepted]], handled: Counter[str],
                     report: Report) -> None:
    marker, message_id = injection.marker, injection.message_id
    assert message_id is not None
    if any(ids != (message_id, injection.thread_id) for ids in injection.answers):
        report.wrong.append(f"{marker}: the same key was answered with other ids: "
                            f"{injection.answers}")
    event = accepted.get(message_id)
    if event is None:
        report.lost.append(f"{marker}: acknowledged {message_id} is not in the log")
        return
    if event.thread_id != injection.thread_id or f"<n>{marker}</n>" not in event.envelope:
        report.wrong.append(f"{marker}: {message_id} is in thread {event.thread_id}, told "
                            f"{injection.thread_id}, envelope {event.envelope!r}")
    conversation = by_marker.get(marker, [])
    injected = [e for e in conversation if e.sender == "api"]
    if len(injected) != 1:
        report.wrong.append(f"{marker}: accepted {len(injected)} times from the API: "
                            f"{[e.message_id for e in injected]}")
    elsewhere = {e.thread_id for e in conversation} - {injection.thread_id}
    if elsewhere:
        report.wrong.append(f"{marker}: messages in other threads {sorted(elsewhere)}")
    hops = by_thread.get(injection.thread_id or "", [])
    if sorted(e.to for e in hops) != HOPS:
        report.wrong.append(f"{marker}: thread {injection.thread_id} holds "
                            f"{sorted(e.to for e in hops)}, not one message per hop")
    if any(marker_of(e.envelope) != marker for e in hops):
        report.wrong.append(f"{marker}: thread {injection.thread_id} carries another marker")
    unhandled = [e.to for e in hops if handled[e.message_id] < 1]
    if unhandled or len(hops) < len(HOPS):
        report.lost.append(f"{marker}: conversation incomplete, hops {sorted(e.to for e in hops)}"
                           f", unhandled {unhandled}")


# ------------------------------------------------------------------ the loop


async def serve(path: Path, port: int, report: Report, load: Load) -> Server:
    """Start the organism until it serves, and note the start in ``report`` and ``load``."""
    server = await start_organism(path, port)
    report.restart_seconds.append(server.started_in)
    report.spawned.append(server.process.pid)
    report.served.append(server.process.pid)
    load.pid = server.process.pid
    return server


async def crash_loop(folder: Path, *, rounds: int, seed: int, clients: int = 8,
                     max_acks: int = 1000, repeat: int = 50, baseline: int = 5) -> Report:
    """Run the whole scenario in ``folder`` (fresh or empty) and return the checked report."""
    path = write_organism(folder)
    rng = random.Random(seed)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load = Load(clients=clients)
    report = Report(rounds=rounds)
    for _ in range(rounds):
        kind = rng.random()
        if kind < 1 / 12:
            # While starting: the log is being opened, repaired and replayed, the backlog queued.
            server = await start_organism(path, port, until=b"Waiting for application startup")
            report.spawned.append(server.process.pid)
            server.kill()
            await server.process.communicate()
            report.startup_kills += 1
            continue
        # One round in six kills at once: while the last crash's backlog is redelivered.
        acks = 0 if kind < 1 / 4 else rng.randint(1, max_acks)
        server = await serve(path, port, report, load)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(server.drain())
            try:
                await load.run_until(base, acks, server.kill)
            finally:
                server.kill()
        await server.process.wait()
    server = await serve(path, port, report, load)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(server.drain())
        try:
            await load.settle(base)
            # Keys hold across restarts: acknowledged injections sent again get their ids back.
            earlier = [i for i in load.injections if i.answered_by != load.pid]
            again = rng.sample(earlier, min(repeat, len(earlier)))
            await load.repeat(base, again)
            report.repeated = len(again)
            async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                live = (await http.get("/api/v1/organism/state")).json()  # once idle
            await check(folder / "events", load, live, report)
        finally:
            if server.process.returncode is None:
                server.process.send_signal(signal.SIGTERM)
        code = await server.process.wait()
    if code != 0:
        report.wrong.append(f"the organism exited with {code} on SIGTERM:\n"
                            + b"".join(server.output).decode(errors="replace"))
    report.baseline_seconds = await baseline_start_times(port, baseline, cwd=folder)
    return report


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def print_report(report: Report) -> None:
    restarts, raw = report.restart_seconds, report.baseline_seconds
    print(f"rounds (SIGKILL + restart)        {report.rounds}")
    print(f"  killed while starting           {report.startup_kills}")
    print(f"injections (distinct)             {report.injections}")
    print(f"  sent again (no answer, or busy) {report.resent}")
    print(f"    already accepted (same key)   {report.kept_by_key}")
    print(f"  answers other than 202          {report.refused or 0}")
    print(f"messages acknowledged             {report.acknowledged}")
    print(f"  sent again after the last start {report.repeated} (each must get its first ids)")
    print(f"messages accepted (from the API)  {report.accepted}")
    print(f"hops accepted                     {report.hops_accepted}")
    print(f"hops handled                      {report.hops_handled}")
    print(f"deliveries                        {report.deliveries}")
    print(f"duplicates delivered              {report.duplicates}")
    print(f"log records                       {report.records}")
    print(f"live state = replay               {report.live.get('digest') == report.replayed[1]}"
          f" (position {report.replayed[0]})")
    print(f"lost                              {len(report.lost)}")
    print(f"wrong                             {len(report.wrong)}")
    if restarts:
        print(f"process start to serving          median {_ms(statistics.median(restarts))}, "
              f"max {_ms(max(restarts))} over {len(restarts)} starts")
        print(f"  first start, last start         {_ms(restarts[0])}, {_ms(restarts[-1])}"
              f" (replays the whole log: a SIGKILL leaves no snapshot)")
    if raw:
        print(f"  RAW BASELINE (uvicorn, empty)   median {_ms(statistics.median(raw))}, "
              f"max {_ms(max(raw))} over {len(raw)} starts")
        print(f"  ratio (median)                  "
              f"{statistics.median(restarts) / statistics.median(raw):.2f}x")
    for problem in (report.lost + report.wrong)[:20]:
        print("  !", problem)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--max-acks", type=int, default=1000,
                        help="a round ends after 0..N acknowledged injections")
    parser.add_argument("--dir", help="keep the organism and its log here (default: a "
                                      "temporary directory)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, seed {args.seed}, "
          f"{args.clients} clients, max {args.max_acks} acks per round", flush=True)
    started = time.perf_counter()
    if args.dir:
        folder = Path(args.dir)
        report = asyncio.run(crash_loop(folder, rounds=args.rounds, seed=args.seed,
                                        clients=args.clients, max_acks=args.max_acks))
    else:
        with tempfile.TemporaryDirectory(prefix="xml-pipeline-chaos-") as name:
            report = asyncio.run(crash_loop(Path(name), rounds=args.rounds, seed=args.seed,
                                            clients=args.clients, max_acks=args.max_acks))
    print_report(report)
    print(f"wall time                         {time.perf_counter() - started:.1f} s")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()

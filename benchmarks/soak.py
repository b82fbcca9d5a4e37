"""Load soak: steady load below capacity, a burst above it, and what the server does meanwhile.

    python benchmarks/soak.py [--minutes 5] [--fraction 0.5] [--burst-seconds 30]
                              [--burst-clients 512] [--dir PATH]

The three-hop chain of ``benchmarks/chaos.py`` (hop1 -> hop2 -> hop3, handlers sleeping 0-2 ms,
concurrency 4, ``fsync: batch``) runs as ``xml-pipeline run`` in a child process. Phases:

1. **capacity**: ``--probe-clients`` clients inject back to back for ``--probe-seconds``; the
   rate of completed conversations (``ThreadCompleted`` on the live tail) over the second half
   is the capacity.
2. **steady**: injections on a fixed schedule (open loop) at ``--fraction`` of the capacity for
   ``--minutes``. Latencies are measured from each injection's *scheduled* time, so a stall
   counts for every injection it delays (no coordinated omission): acknowledgement (202) and
   end to end (``ThreadCompleted`` seen on ``GET /api/v1/events``).
3. **burst**: ``--burst-clients`` clients inject back to back, without backing off, for
   ``--burst-seconds``: far above capacity. Every answer is counted by status; the server must
   answer 429/503 rather than queue without bound. Then a **polite** burst: the same clients,
   each waiting what ``Retry-After`` says after a refusal, as a well-behaved client does.
4. **drain** (until ``GET /organism/state`` says idle) and **recovery**: the steady rate again
   for ``--recovery-seconds``.

The server's resident memory (``/proc/PID/status`` VmRSS) is sampled every second throughout.
It prints per-minute latency percentiles and memory, the growth of memory over the steady
phase, the burst's answers, and a RAW BASELINE: the same clients against uvicorn serving an
empty Starlette endpoint in the same interpreter (the HTTP floor under every figure). Nothing
here asserts a time; it exits 1 only if a request fails at the transport level below capacity
or a 5xx other than 503 is seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import free_port, spawn, start_organism, write_organism  # noqa: E402

BASELINE_APP = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

async def inject(request):
    await request.body()
    return JSONResponse({"message_id": "m", "thread_id": "t"}, status_code=202)

app = Starlette(routes=[Route("/api/v1/inject", inject, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info",
            access_log=False, loop="uvloop", http="httptools")
"""

SAMPLE_EVERY = 1.0  # seconds between memory samples


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


# ------------------------------------------------------------------ what is observed


@dataclass
class Observations:
    """Everything the phases record, keyed by monotonic time."""

    scheduled: dict[str, float] = field(default_factory=dict)  # thread id -> scheduled time
    completed: dict[str, float] = field(default_factory=dict)  # thread id -> seen completed
    acks: list[tuple[float, float]] = field(default_factory=list)  # (scheduled, ack latency)
    ends: list[tuple[float, float]] = field(default_factory=list)  # (scheduled, end to end)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # transport errors by type
    memory: list[tuple[float, float]] = field(default_factory=list)  # (time, MiB)
    completions: list[float] = field(default_factory=list)  # time each completion was seen

    def acknowledged(self, thread: str, scheduled: float, now: float) -> None:
        self.acks.append((scheduled, now - scheduled))
        seen = self.completed.pop(thread, None)
        if seen is None:
            self.scheduled[thread] = scheduled
        else:
            self.ends.append((scheduled, seen - scheduled))

    def complete(self, thread: str, now: float) -> None:
        self.completions.append(now)
        scheduled = self.scheduled.pop(thread, None)
        if scheduled is None:
            self.completed[thread] = now  # the tail was faster than the 202's reader
        else:
            self.ends.append((scheduled, now - scheduled))


async def follow_completions(base: str, after: int, seen: Observations,
                             ready: asyncio.Event) -> None:
    """Record every ``ThreadCompleted`` on the live tail (SSE) until cancelled."""
    async with httpx.AsyncClient(base_url=base, timeout=None) as http:
        async with http.stream("GET", "/api/v1/events",
                               params={"after": after, "type": "ThreadCompleted"}) as response:
            response.raise_for_status()
            ready.set()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    thread = json.loads(line[6:])["data"]["thread_id"]
                    seen.complete(thread, time.monotonic())


async def sample_memory(pid: int, seen: Observations) -> None:
    while True:
        seen.memory.append((time.monotonic(), rss_mib(pid)))
        await asyncio.sleep(SAMPLE_EVERY)


# ------------------------------------------------------------------ the load


class Connection:
    """A minimal keep-alive HTTP/1.1 client for ``POST /api/v1/inject``: httpx costs about
    five times more CPU per request, and the load generator shares the machine's cores with
    the server it measures."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes, float | None]:
        """(status, body, Retry-After seconds or None)."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s"
                         % (path.encode(), self.host.encode(), self.port, len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            close = False
            retry_after = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif name == b"retry-after":
                    retry_after = float(value)
            answer = await reader.readexactly(length)
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, answer, retry_after

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


class Injector:
    def __init__(self, base: str, seen: Observations) -> None:
        host, _, port = base.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.seen = seen
        self.count = 0

    def body(self) -> bytes:
        self.count += 1
        return b'{"to": "hop1", "payload": "<Item><n>s%d</n></Item>"}' % self.count

    async def once(self, connection: Connection, scheduled: float) -> tuple[int, float | None]:
        """One injection: its status (0 for a transport error) and Retry-After."""
        try:
            status, answer, retry_after = await connection.post("/api/v1/inject", self.body())
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            self.seen.failures[type(error).__name__] += 1
            return 0, None
        now = time.monotonic()
        self.seen.statuses[status] += 1
        if status == 202:
            self.seen.acknowledged(json.loads(answer)["thread_id"], scheduled, now)
        return status, retry_after

    async def scheduled(self, rate: float, seconds: float, *, workers: int = 64) -> None:
        """Open loop: injection i is due at start + i / rate, whoever is free sends it."""
        start = time.monotonic()
        due = iter(range(int(rate * seconds)))

        async def worker() -> None:
            connection = Connection(self.host, self.port)
            try:
                for index in due:
                    at = start + index / rate
                    delay = at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await self.once(connection, at)
            finally:
                connection.close()

        async with asyncio.TaskGroup() as tasks:
            for _ in range(workers):
                tasks.create_task(worker())

    async def flat_out(self, clients: int, seconds: float, *, back_off: float = 0.0,
                       polite: bool = False) -> None:
        """Closed loop: each client sends its next injection as soon as it has an answer;
        after a refusal it waits ``back_off`` seconds, or (``polite``) what Retry-After says."""
        end = time.monotonic() + seconds

        async def client() -> None:
            connection = Connection(self.host, self.port)
            try:
                while time.monotonic() < end:
                    status, retry_after = await self.once(connection, time.monotonic())
                    if status != 202 and polite and retry_after is not None:
                        await asyncio.sleep(min(retry_after, max(0.0, end - time.monotonic())))
                    elif status != 202 and back_off:
                        await asyncio.sleep(back_off)
            finally:
                connection.close()

        async with asyncio.TaskGroup() as tasks:
            for _ in range(clients):
                tasks.create_task(client())


# ------------------------------------------------------------------ the report


def window(pairs: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [value for at, value in pairs if start <= at < end]


def latency_line(label: str, values: list[float]) -> str:
    if not values:
        return f"{label:<22}{'-':>8}"
    return (f"{label:<22}{len(values):>8}{ms(percentile(values, 0.5))}"
            f"{ms(percentile(values, 0.9))}{ms(percentile(values, 0.99))}{ms(max(values))}")


def memory_in(seen: Observations, start: float, end: float) -> list[float]:
    return [mib for at, mib in seen.memory if start <= at < end]


@dataclass
class Phase:
    name: str
    start: float
    end: float
    statuses: Counter[int]
    failures: Counter[str]


async def phase(seen: Observations, name: str, body: Callable[[], Awaitable[None]],
                phases: list[Phase]) -> Phase:
    statuses, failures = Counter(seen.statuses), Counter(seen.failures)
    start = time.monotonic()
    print(f"[{name}] ...", flush=True)
    await body()
    done = Phase(name, start, time.monotonic(), seen.statuses - statuses,
                 seen.failures - failures)
    phases.append(done)
    print(f"[{name}] {done.end - done.start:.1f} s, answers {dict(done.statuses)}"
          f"{f', transport errors {dict(done.failures)}' if done.failures else ''}", flush=True)
    return done


async def wait_idle(base: str) -> float:
    """Seconds until the organism reports nothing in flight."""
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        while not (await http.get("/api/v1/organism/state")).json()["idle"]:
            pass
    return time.monotonic() - start


async def baseline(rate: float, seconds: float, cwd: Path) -> tuple[list[float], float]:
    """RAW BASELINE: the steady schedule against an empty endpoint; (ack latencies, rate)."""
    port = free_port()
    server = await spawn(["-c", BASELINE_APP, str(port)], cwd=cwd)
    drain = asyncio.ensure_future(server.drain())
    try:
        base = f"http://127.0.0.1:{port}"
        seen = Observations()
        injector = Injector(base, seen)
        await injector.scheduled(rate, seconds)
        flat = Observations()
        await Injector(base, flat).flat_out(32, 5.0)
        return [latency for _, latency in seen.acks], flat.statuses[202] / 5.0
    finally:
        server.kill()
        await server.process.wait()
        await drain


async def soak(folder: Path, args: argparse.Namespace) -> int:
    organism = write_organism(folder)
    if args.snapshot_every is not None:
        organism.write_text(organism.read_text().replace(
            "fsync: batch}", f"fsync: batch, snapshot_every: {args.snapshot_every}}}"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = await start_organism(organism, port)
    drain = asyncio.ensure_future(server.drain())
    seen = Observations()
    ready = asyncio.Event()
    follower = asyncio.ensure_future(follow_completions(base, 0, seen, ready))
    sampler = asyncio.ensure_future(sample_memory(server.process.pid, seen))
    injector = Injector(base, seen)
    phases: list[Phase] = []
    try:
        await asyncio.wait_for(ready.wait(), 30)
        probe = await phase(seen, "capacity", lambda: injector.flat_out(
            args.probe_clients, args.probe_seconds, back_off=0.01), phases)
        half = probe.start + (probe.end - probe.start) / 2
        completed = [at for at in seen.completions if half <= at < probe.end]
        capacity = len(completed) / (probe.end - half)
        print(f"capacity: {capacity:.0f} conversations/s "
              f"({capacity * 3:.0f} messages/s, 3 hops each)", flush=True)
        idle_after_probe = await wait_idle(base)
        rate = capacity * args.fraction
        print(f"steady rate: {rate:.0f} injections/s for {args.minutes} min "
              f"(drained the probe's backlog in {idle_after_probe:.1f} s)", flush=True)
        steady = await phase(seen, "steady", lambda: injector.scheduled(
            rate, args.minutes * 60), phases)
        burst = await phase(seen, "burst", lambda: injector.flat_out(
            args.burst_clients, args.burst_seconds), phases)
        drained = await wait_idle(base)
        print(f"[drain] idle {drained:.1f} s after the burst", flush=True)
        polite = await phase(seen, "polite", lambda: injector.flat_out(
            args.burst_clients, args.burst_seconds, polite=True), phases)
        print(f"[drain] idle {await wait_idle(base):.1f} s after the polite burst", flush=True)
        recovery = await phase(seen, "recovery", lambda: injector.scheduled(
            rate, args.recovery_seconds), phases)
        await wait_idle(base)
    finally:
        follower.cancel()
        sampler.cancel()
        server.process.terminate()
        await server.process.wait()
        drain.cancel()
        for task in (follower, sampler, drain):
            with suppress(asyncio.CancelledError, httpx.HTTPError):
                await task

    raw, raw_flat = await baseline(rate, min(60.0, args.minutes * 60), folder)
    return report(seen, phases, steady, burst, polite, recovery, rate=rate, capacity=capacity,
                  drained=drained, raw=raw, raw_flat=raw_flat)


def report(seen: Observations, phases: list[Phase], steady: Phase, burst: Phase,
           polite: Phase, recovery: Phase, *, rate: float, capacity: float, drained: float,
           raw: list[float], raw_flat: float) -> int:
    print()
    print(f"capacity {capacity:.0f} conversations/s; steady rate {rate:.0f}/s "
          f"({rate / capacity:.0%} of capacity)")
    print(f"{'latency (ms)':<22}{'count':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    minute = 60.0
    at = steady.start
    while at < steady.end - 1:
        until = min(at + minute, steady.end)
        label = f"{(at - steady.start) / 60:.0f}-{(until - steady.start) / 60:.0f} min"
        print(latency_line(f"ack {label}", window(seen.acks, at, until)))
        print(latency_line(f"end-to-end {label}", window(seen.ends, at, until)))
        at = until
    print(latency_line("ack steady", window(seen.acks, steady.start, steady.end)))
    print(latency_line("end-to-end steady", window(seen.ends, steady.start, steady.end)))
    print(latency_line("ack burst (202 only)", window(seen.acks, burst.start, burst.end)))
    print(latency_line("ack polite (202 only)", window(seen.acks, polite.start, polite.end)))
    print(latency_line("ack recovery", window(seen.acks, recovery.start, recovery.end)))
    print(latency_line("end-to-end recovery", window(seen.ends, recovery.start, recovery.end)))
    print(latency_line("RAW BASELINE ack", raw))
    print(f"RAW BASELINE flat out: {raw_flat:.0f} requests/s answered by an empty endpoint")
    print()
    print("server memory (RSS MiB): start / after 1 min / end of steady / peak in burst / end")
    steady_memory = memory_in(seen, steady.start, steady.end)
    first_minute = memory_in(seen, steady.start + 55, steady.start + 65) or steady_memory[:1]
    burst_memory = memory_in(seen, burst.start, polite.end)
    print(f"  {seen.memory[0][1]:.1f} / {first_minute[0]:.1f} / {steady_memory[-1]:.1f} / "
          f"{max(burst_memory):.1f} / {seen.memory[-1][1]:.1f}")
    span = (steady.end - steady.start - 60) / 60
    if span > 0:
        growth = steady_memory[-1] - first_minute[0]
        print(f"  growth over the steady phase after its first minute: {growth:+.1f} MiB "
              f"({growth / span:+.2f} MiB/min, {growth * 1024 / max(1, rate * span * 60):.2f} "
              f"KiB per injection)")
    print()
    for done in phases:
        answered = sum(done.statuses.values())
        shares = ", ".join(f"{code}: {count} ({count / max(1, answered):.1%})"
                           for code, count in sorted(done.statuses.items()))
        print(f"{done.name:<10} {answered:>7} answers in {done.end - done.start:6.1f} s: "
              f"{shares}{f'; transport errors {dict(done.failures)}' if done.failures else ''}")
    print(f"burst drained (organism idle) {drained:.1f} s after it ended")
    bad = [code for code in seen.statuses if code >= 500 and code != 503]
    below = steady.failures + recovery.failures
    if bad or below:
        print(f"FAILED: unexpected answers {bad}, transport errors below capacity {dict(below)}")
        return 1
    return 0


def main() -> None:
    with suppress(ImportError):
        import uvloop  # the server runs on uvloop too

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="steady rate as a share of the measured capacity")
    parser.add_argument("--probe-clients", type=int, default=32)
    parser.add_argument("--probe-seconds", type=float, default=20.0)
    parser.add_argument("--burst-clients", type=int, default=512)
    parser.add_argument("--burst-seconds", type=float, default=30.0)
    parser.add_argument("--recovery-seconds", type=float, default=30.0)
    parser.add_argument("--snapshot-every", type=int,
                        help="the organism's log.snapshot_every (default: its default)")
    parser.add_argument("--dir", type=Path, help="where the organism and its log go "
                                                 "(default: a temporary folder)")
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        sys.exit(asyncio.run(soak(args.dir, args)))
    with tempfile.TemporaryDirectory() as name:
        sys.exit(asyncio.run(soak(Path(name), args)))


if __name__ == "__main__":
    main()

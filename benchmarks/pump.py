"""Pump throughput and latency, next to the raw baseline of design section 13.

Prints messages/s and p50/p99 latency (inject to handler) for one hop and for a two-hop echo,
on a file log with fsync: batch, and the same figures for a raw loop doing the bare minimum for
the same messages: hardened lxml parse, envelope + payload validation with compiled XMLSchema,
an asyncio.Queue hop to a long-lived worker, the handler call, and a group-committed append to a
file through a writer thread.

    python benchmarks/pump.py [--messages 20000] [--producers 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from lxml import etree

from xml_pipeline.config import load_organism
from xml_pipeline.envelope import envelope_schema
from xml_pipeline.log.file import open_file_log
from xml_pipeline.runtime.pump import open_pump
from xml_pipeline.schemas import load_schema
from xml_pipeline.xmlsafe import parse_xml

ITEM_XSD = """<?xml version="1.0"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Item"><xs:complexType><xs:sequence>
    <xs:element name="n" type="xs:string"/>
  </xs:sequence></xs:complexType></xs:element>
</xs:schema>
"""

HANDLERS = """
import time
latencies = []
sent_at = {}

async def sink(payload, ctx):
    latencies.append(time.perf_counter() - sent_at.pop(payload.findtext("n")))

async def ping(payload, ctx):
    await ctx.send("pong", payload)

async def pong(payload, ctx):
    latencies.append(time.perf_counter() - sent_at.pop(payload.findtext("n")))
"""

ORGANISM = """
organism: {name: bench, log: {path: events, fsync: batch}}
listeners:
  - {name: sink, description: d, payload: item.xsd, handler: "bench_handlers:sink"}
  - {name: ping, description: d, payload: item.xsd, handler: "bench_handlers:ping",
     peers: [pong]}
  - {name: pong, description: d, payload: item.xsd, handler: "bench_handlers:pong"}
"""

ENVELOPE = ('<message xmlns="urn:xml-pipeline:envelope:v1"><meta>'
            "<id>01JABCDEFGHJKMNPQRSTVWXYZ0</id><from>api</from><to>sink</to>"
            "<thread>01JABCDEFGHJKMNPQRSTVWXYZ1</thread><sent>2026-11-26T05:00:00.123Z</sent>"
            '</meta><Item xmlns=""><n>{n}</n></Item></message>')


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return (ordered[len(ordered) // 2] * 1e3, ordered[int(len(ordered) * 0.99)] * 1e3)


class _GroupCommit:
    """The raw baseline's writer: one thread, one write + fdatasync per batch."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.loop = loop
        self.queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.queue:
                    return
                taken, self.queue = self.queue, []
            os.write(self.fd, b"".join(data for data, _ in taken))
            os.fdatasync(self.fd)
            self.loop.call_soon_threadsafe(_resolve, [f for _, f in taken])

    async def append(self, data: bytes) -> None:
        future = self.loop.create_future()
        with self.cond:
            self.queue.append((data, future))
            self.cond.notify()
        await future

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()
        os.close(self.fd)


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


async def raw_baseline(folder: Path, messages: int, producers: int, hops: int
                       ) -> tuple[float, list[float]]:
    schema = load_schema(folder / "item.xsd")
    envelope = envelope_schema()
    writer = _GroupCommit(folder / "raw.log", asyncio.get_running_loop())
    queue: asyncio.Queue[tuple[etree._Element, float, int]] = asyncio.Queue()
    latencies: list[float] = []
    done = asyncio.Event()

    async def accept(data: bytes, started: float, hop: int) -> None:
        root = parse_xml(data)
        if not envelope.validate(root):
            raise AssertionError("invalid envelope")
        payload = root[1]
        schema.validate(payload)
        await writer.append(data)
        queue.put_nowait((payload, started, hop))

    forwarding: set[asyncio.Task[None]] = set()

    async def worker() -> None:
        while True:
            payload, started, hop = await queue.get()
            if hop + 1 < hops:
                # The next hop is appended while the worker takes the next message.
                task = asyncio.ensure_future(
                    accept(ENVELOPE.format(n=payload.findtext("n")).encode(), started, hop + 1))
                forwarding.add(task)
                task.add_done_callback(forwarding.discard)
                continue
            latencies.append(time.perf_counter() - started)
            if len(latencies) == messages:
                done.set()

    async def producer(share: range) -> None:
        for k in share:
            await accept(ENVELOPE.format(n=k).encode(), time.perf_counter(), 0)

    async with asyncio.TaskGroup() as group:
        workers = [group.create_task(worker()) for _ in range(2)]
        started = time.perf_counter()
        await asyncio.gather(*(producer(range(p, messages, producers)) for p in range(producers)))
        await done.wait()
        elapsed = time.perf_counter() - started
        for task in workers:
            task.cancel()
    writer.close()
    return messages / elapsed, latencies


async def product(folder: Path, messages: int, producers: int, target: str
                  ) -> tuple[float, list[float]]:
    shutil.rmtree(folder / "events", ignore_errors=True)
    sys.path.insert(0, str(folder))
    import bench_handlers  # type: ignore[import-not-found]

    bench_handlers.latencies.clear()
    organism = load_organism(folder / "organism.yaml")
    log = await open_file_log(folder / "events", fsync="batch")
    async with open_pump(organism, log, mailbox_capacity=max(1000, producers * 2)) as pump:
        async def producer(share: range) -> None:
            for k in share:
                bench_handlers.sent_at[str(k)] = time.perf_counter()
                await pump.inject(f"<Item><n>{k}</n></Item>", to=target, wait=True)

        started = time.perf_counter()
        await asyncio.gather(*(producer(range(p, messages, producers)) for p in range(producers)))
        await pump.wait_idle()
        elapsed = time.perf_counter() - started
    await log.aclose()
    return messages / elapsed, list(bench_handlers.latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--producers", type=int, default=64)
    args = parser.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found]
        loop_name = "uvloop"
    except ImportError:
        uvloop = None
        loop_name = "asyncio"
    run = uvloop.run if uvloop else asyncio.run
    folder = Path(tempfile.mkdtemp(prefix="xml-pipeline-bench-"))
    try:
        (folder / "item.xsd").write_text(ITEM_XSD)
        (folder / "bench_handlers.py").write_text(textwrap.dedent(HANDLERS))
        (folder / "organism.yaml").write_text(ORGANISM)
        print(f"pump benchmark: {args.messages} messages, {args.producers} producers, "
              f"fsync batch, {loop_name}, python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cpus")
        for label, target, hops in (("one hop", "sink", 1), ("two-hop echo", "ping", 2)):
            raw_rate, raw_lat = run(raw_baseline(folder, args.messages, args.producers, hops))
            rate, lat = run(product(folder, args.messages, args.producers, target))
            raw_p50, raw_p99 = _percentiles(raw_lat)
            p50, p99 = _percentiles(lat)
            print(f"{label:>13}: raw baseline {raw_rate:9.0f} msg/s  p50 {raw_p50:6.2f} ms  "
                  f"p99 {raw_p99:6.2f} ms")
            print(f"{'':>13}  xml-pipeline {rate:9.0f} msg/s  p50 {p50:6.2f} ms  "
                  f"p99 {p99:6.2f} ms  = {rate / raw_rate:.0%} of baseline")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Time from saving organism.yaml to the new organism being in force.

Measures, for the same edits in the same run:
- raw baseline: watchfiles reporting the change (same debounce) plus ``load_organism`` of the
  new file, i.e. the bare minimum any hot reload must do;
- xml-pipeline: the running pump's watcher, from the moment the file is renamed into place to
  the moment ``OrganismReloaded`` is durable and folded (the swap is done).

    python benchmarks/reload.py [--rounds 20] [--debounce-ms 50] [--listeners 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import watchfiles

from xml_pipeline.config import load_organism
from xml_pipeline.events import Event, OrganismReloaded
from xml_pipeline.log.file import open_file_log
from xml_pipeline.runtime.pump import open_pump
from xml_pipeline.runtime.reload import watch

ITEM_XSD = """<?xml version="1.0"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">
  <xs:element name="Item"><xs:complexType><xs:sequence>
    <xs:element name="n" type="xs:string"/>
  </xs:sequence></xs:complexType></xs:element>
</xs:schema>
"""


def organism_text(listeners: int, round_: int) -> str:
    lines = ["organism: {name: reload-bench}", "listeners:"]
    for k in range(listeners):
        lines.append(f"  - {{name: l{k}, description: 'round {round_}', "
                     f"payload: item.xsd, handler: 'bench_reload:noop'}}")
    return "\n".join(lines) + "\n"


def save(path: Path, text: str) -> float:
    """Write like an editor (temporary file, then rename); the time of the rename."""
    temporary = path.with_name(path.name + ".swp")
    temporary.write_text(text)
    started = time.perf_counter()
    os.replace(temporary, path)
    return started


async def raw(folder: Path, rounds: int, debounce: int, listeners: int) -> list[float]:
    path = folder / "organism.yaml"
    times: list[float] = []
    stop = asyncio.Event()
    changes = watchfiles.awatch(str(folder), debounce=debounce, step=20, stop_event=stop,
                                recursive=False, rust_timeout=200, yield_on_timeout=True,
                                watch_filter=lambda _c, p: p.endswith("organism.yaml"))
    iterator = changes.__aiter__()
    await iterator.__anext__()  # the first (empty) tick: the watcher is running
    for round_ in range(rounds):
        started = save(path, organism_text(listeners, 1000 + round_))
        while not await iterator.__anext__():
            pass
        load_organism(path)
        times.append(time.perf_counter() - started)
    stop.set()
    return times


async def product(folder: Path, rounds: int, debounce: int, listeners: int) -> list[float]:
    path = folder / "organism.yaml"
    log = await open_file_log(folder / "events")
    times: list[float] = []
    swapped: asyncio.Queue[float] = asyncio.Queue()

    def observer(position: int, event: Event) -> None:
        if isinstance(event, OrganismReloaded):
            swapped.put_nowait(time.perf_counter())

    async with open_pump(load_organism(path), log) as pump:
        pump.observe(observer)
        stop = asyncio.Event()
        results: asyncio.Queue[object] = asyncio.Queue()
        watcher = asyncio.ensure_future(watch(pump, stop=stop, debounce_ms=debounce,
                                              on_result=results.put_nowait))
        # A first save, not timed, to know the watcher is running.
        save(path, organism_text(listeners, -2))
        await asyncio.wait_for(swapped.get(), 30)
        for round_ in range(rounds):
            started = save(path, organism_text(listeners, round_))
            done = await asyncio.wait_for(swapped.get(), 30)
            times.append(done - started)
        stop.set()
        await watcher
    await log.aclose()
    return times


def summary(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    return (f"median {statistics.median(ms):7.1f} ms  p90 {ms[int(len(ms) * 0.9)]:7.1f} ms  "
            f"max {ms[-1]:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--debounce-ms", type=int, default=50)
    parser.add_argument("--listeners", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xml-pipeline-reload-") as name:
        folder = Path(name)
        (folder / "item.xsd").write_text(ITEM_XSD)
        (folder / "bench_reload.py").write_text(textwrap.dedent("""
            async def noop(payload, ctx):
                return None
        """))
        (folder / "organism.yaml").write_text(organism_text(args.listeners, -1))
        sys.path.insert(0, str(folder))
        print(f"reload benchmark: {args.rounds} saves, debounce {args.debounce_ms} ms, "
              f"{args.listeners} listeners, python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cpus")
        raw_times = asyncio.run(raw(folder, args.rounds, args.debounce_ms, args.listeners))
        product_times = asyncio.run(product(folder, args.rounds, args.debounce_ms,
                                            args.listeners))
        print(f"  raw baseline (watch + load_organism): {summary(raw_times)}")
        print(f"  xml-pipeline (save to swap):          {summary(product_times)}  = "
              f"{statistics.median(product_times) / statistics.median(raw_times):.2f}x "
              "the baseline")


if __name__ == "__main__":
    main()

"""Append throughput of the file log, as a ratio to a raw group-commit writer in the same run.

    python benchmarks/log_append.py [--events N] [--always-events N] [--repeat R] [--dir PATH]
                                    [--only TEXT] [--breakdown] [--profile]

Every scenario runs the product (``open_file_log`` + ``await log.append(...)`` from many asyncio
tasks; the ``append_nowait`` scenarios await the future of ``log.append_nowait(...)`` instead,
as the pump does) and a RAW BASELINE doing the bare minimum for the same work in the same process: a
writer thread that takes everything queued, ``os.write``s the very same frame bytes (encoded
beforehand, outside the timing), ``os.fdatasync``s once per batch (or once per record for the
``always`` scenario) and resolves the producers' futures with ``call_soon_threadsafe``.
The two alternate ``--repeat`` times on fresh directories; the medians are reported, with
product/baseline as the figure that compares across machines. Nothing here asserts a time.

Target (the issue, 2-core machine): fsync=batch with many single-event producers reaches at
least 40% of the raw group-commit baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import platform
import pstats
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload  # noqa: E402

from xml_pipeline.events import Event, encode  # noqa: E402
from xml_pipeline.log.file import open_file_log  # noqa: E402
from xml_pipeline.log.file.segments import GENESIS, make_frame  # noqa: E402

TARGET_BATCH_RATIO = 0.40


@dataclass
class Run:
    seconds: float
    events: int
    commits: int
    fsyncs: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def mean_batch(self) -> float:
        return self.events / self.commits if self.commits else 0.0


# ------------------------------------------------------------------ the raw baseline


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        future.set_result(None)


class RawWriter:
    """The bare minimum: a thread, a queue under a condition, write + fdatasync, wake-ups."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop, fsync: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.loop = loop
        self.fsync = fsync
        self.cond = threading.Condition()
        self.queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self.stopping = False
        self.commits = 0
        self.fsyncs = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def _run(self) -> None:
        cond, fd = self.cond, self.fd
        while True:
            with cond:
                while not self.queue and not self.stopping:
                    cond.wait()
                if not self.queue:
                    return
                taken, self.queue = self.queue, []
            if self.fsync == "always":  # one write + fsync per append, as fsync=always does
                for data, future in taken:
                    self._write(data)
                    os.fdatasync(fd)
                    self.fsyncs += 1
                    self.commits += 1
                    self.loop.call_soon_threadsafe(_resolve, [future])
                continue
            self._write(b"".join([data for data, _ in taken]) if len(taken) > 1 else taken[0][0])
            if self.fsync == "batch":
                os.fdatasync(fd)
                self.fsyncs += 1
            self.commits += 1
            self.loop.call_soon_threadsafe(_resolve, [future for _, future in taken])

    async def append(self, records: Sequence[bytes]) -> None:
        future = self.loop.create_future()
        data = records[0] if len(records) == 1 else b"".join(records)
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


# ------------------------------------------------------------------ the two sides


def _deal(items: list, producers: int, per_append: int) -> list[list]:
    """Split items into appends of ``per_append`` and deal them round-robin to producers."""
    appends = [items[i:i + per_append] for i in range(0, len(items), per_append)]
    return [appends[p::producers] for p in range(producers)]


async def _drive(append: Callable, work: list[list]) -> float:
    async def producer(appends: list) -> None:
        for chunk in appends:
            await append(chunk)

    started = time.perf_counter()
    await asyncio.gather(*(producer(appends) for appends in work))
    return time.perf_counter() - started


async def run_product(root: Path, fsync: str, events: list[Event], producers: int,
                      per_append: int, nowait: bool = False) -> Run:
    directory = Path(tempfile.mkdtemp(prefix="product-", dir=root))
    try:
        log = await open_file_log(directory, fsync=fsync)
        try:
            # append() awaits append_nowait()'s future through asyncio.shield; the nowait
            # scenarios await that future directly, as the pump does.
            append = log.append_nowait if nowait else log.append
            seconds = await _drive(append, _deal(events, producers, per_append))
            stats = log.statistics()
        finally:
            await log.aclose()
        assert stats.last_position == len(events), stats
        return Run(seconds, stats.appended, stats.batches, stats.fsyncs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def run_raw(root: Path, fsync: str, records: list[bytes], producers: int,
                  per_append: int) -> Run:
    directory = Path(tempfile.mkdtemp(prefix="raw-", dir=root))
    try:
        writer = RawWriter(directory / "raw.log", asyncio.get_running_loop(), fsync)
        try:
            seconds = await _drive(writer.append, _deal(records, producers, per_append))
        finally:
            writer.close()
        assert os.path.getsize(directory / "raw.log") == sum(map(len, records))
        return Run(seconds, len(records), writer.commits, writer.fsyncs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def frames_of(events: list[Event]) -> list[bytes]:
    """The exact bytes the file log writes for ``events`` (encoded here, outside any timing)."""
    records, previous = [], GENESIS
    for position, event in enumerate(events, start=1):
        type_name, version, data = encode(event)
        frame, previous = make_frame(position=position, at=event.at, type_name=type_name,
                                     version=version, data=data, previous=previous)
        records.append(frame)
    return records


# ------------------------------------------------------------------ where the time goes


def _per_call(fn: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) / count * 1e6


async def breakdown(events: list[Event]) -> None:
    """Costs of the pieces of one single-event append, measured alone on this machine."""
    loop = asyncio.get_running_loop()
    sample = events[: min(len(events), 50_000)]
    count = len(sample)
    encoded = [encode(event) for event in sample]

    def encode_all() -> None:
        for event in sample:
            encode(event)

    def frame_all() -> None:
        previous = GENESIS
        pairs = zip(encoded, sample, strict=True)
        for position, ((type_name, version, data), event) in enumerate(pairs, 1):
            _, previous = make_frame(position=position, at=event.at, type_name=type_name,
                                     version=version, data=data, previous=previous)

    tasks = 256  # as many waiters as the busiest scenario, so loop passes are shared

    async def plain() -> None:
        for _ in range(count // tasks):
            future = loop.create_future()
            loop.call_soon(future.set_result, None)
            await future

    async def shielded() -> None:
        for _ in range(count // tasks):
            future = loop.create_future()
            loop.call_soon(future.set_result, None)
            await asyncio.shield(future)

    cond = threading.Condition()
    queue: list = []

    def submit_all() -> None:
        for item in sample:
            with cond:
                queue.append(item)
                cond.notify()

    print("where the time of one single-event append goes (each piece alone, us per call):")
    print(f"  events.encode (msgspec)                        {_per_call(encode_all, count):6.2f}")
    print(f"  segments.make_frame (struct, blake2b, crc32)   {_per_call(frame_all, count):6.2f}")
    awaits = count // tasks * tasks
    started = time.perf_counter()
    await asyncio.gather(*(plain() for _ in range(tasks)))
    plain_us = (time.perf_counter() - started) / awaits * 1e6
    started = time.perf_counter()
    await asyncio.gather(*(shielded() for _ in range(tasks)))
    shield_us = (time.perf_counter() - started) / awaits * 1e6
    print(f"  256 tasks: await a future the loop resolves    {plain_us:6.2f}")
    print(f"  256 tasks: await asyncio.shield(future), same  {shield_us:6.2f}  "
          f"(shield adds {shield_us - plain_us:.2f})")
    print(f"  queue under a threading.Condition + notify     {_per_call(submit_all, count):6.2f}")
    print()


async def profile(root: Path, events: list[Event]) -> None:
    """cProfile of the event-loop thread during fsync=batch, 256 single-event producers."""
    profiler = cProfile.Profile()
    profiler.enable()
    run = await run_product(root, "batch", events, 256, 1)
    profiler.disable()
    print(f"cProfile, product fsync=batch 256 x 1 ({run.rate:,.0f} ev/s under the profiler), "
          "top 20 by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


# ------------------------------------------------------------------ reporting


def _median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


def _line(label: str, run: Run, spread: tuple[float, float]) -> str:
    low, high = spread
    return (f"  {label:<9} {run.rate:>10,.0f} ev/s  (runs {low:,.0f}-{high:,.0f})  "
            f"{1e6 / run.rate:6.1f} us/ev  mean batch {run.mean_batch:7.1f}  "
            f"commits {run.commits:>7,}  fsyncs {run.fsyncs:>7,}")


async def scenario(name: str, root: Path, fsync: str, raw_fsync: str, events: list[Event],
                   records: list[bytes], producers: int, per_append: int, repeat: int,
                   nowait: bool) -> dict:
    product_runs, raw_runs = [], []
    for index in range(repeat):
        # Alternate which side goes first, so neither always gets the warmer disk or cache.
        if index % 2 == 0:
            raw_runs.append(await run_raw(root, raw_fsync, records, producers, per_append))
            product_runs.append(await run_product(root, fsync, events, producers, per_append,
                                                  nowait))
        else:
            product_runs.append(await run_product(root, fsync, events, producers, per_append,
                                                  nowait))
            raw_runs.append(await run_raw(root, raw_fsync, records, producers, per_append))
    product, raw = _median_run(product_runs), _median_run(raw_runs)
    ratio = product.rate / raw.rate
    print(f"{name}: {len(events):,} events, {producers} producers x {per_append}-event appends")
    print(_line("raw", raw, (min(r.rate for r in raw_runs), max(r.rate for r in raw_runs))))
    print(_line("product", product,
                (min(r.rate for r in product_runs), max(r.rate for r in product_runs))))
    print(f"  ratio product/raw = {ratio:.2f}")
    return {"name": name, "producers": producers, "per_append": per_append, "ratio": ratio,
            "product": product, "raw": raw}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000,
                        help="events per run for the batch and never scenarios")
    parser.add_argument("--always-events", type=int, default=5_000,
                        help="events per run for the fsync=always scenarios")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side (median kept)")
    parser.add_argument("--dir", default=None,
                        help="where the temporary logs go (default: the system temp dir; "
                             "must be a real disk for fsync figures to mean anything)")
    parser.add_argument("--only", default=None,
                        help="run only scenarios whose name contains this text")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the pieces of one append on their own")
    parser.add_argument("--profile", action="store_true",
                        help="also run fsync=batch, 256 single-event producers under cProfile")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="xp-bench-append-", dir=args.dir))
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus, "
          f"{asyncio.get_running_loop().__class__.__name__}; logs in {root}")
    print("load average at start: {:.2f} {:.2f} {:.2f} (other work on the machine skews the "
          "absolute figures; the ratios are the comparable part)".format(*os.getloadavg()))
    try:
        all_events = list(workload.events(max(args.events, args.always_events)))
        all_records = frames_of(all_events)
        sizes = sum(map(len, all_records[: args.events])) / args.events
        print(f"event mix: {workload.EVENTS_PER_CONVERSATION} events per conversation, "
              f"~{workload.ENVELOPE_BYTES}-byte envelopes, mean frame {sizes:.0f} bytes\n")
        events, records = all_events[: args.events], all_records[: args.events]
        few_events = all_events[: args.always_events]
        few_records = all_records[: args.always_events]
        if args.breakdown:
            await breakdown(events)
        plan = [
            ("batch/single", "batch", events, records, 64, 1),
            ("batch/single", "batch", events, records, 256, 1),
            ("batch/single-nowait", "batch", events, records, 64, 1),
            ("batch/single-nowait", "batch", events, records, 256, 1),
            ("batch/batched", "batch", events, records, 16, 64),
            ("batch/batched", "batch", events, records, 1, 1024),
            ("always/single", "always", few_events, few_records, 64, 1),
            ("never/single", "never", events, records, 256, 1),
        ]
        results = []
        for name, fsync, evs, recs, producers, per_append in plan:
            if args.only and args.only not in name:
                continue
            kind = name.split("/")[1]
            nowait = kind.endswith("-nowait")
            label = f"fsync={fsync} ({kind.removesuffix('-nowait')} " + (
                "append_nowait)" if nowait else "append)")
            results.append(await scenario(label, root, fsync, fsync, evs, recs, producers,
                                          per_append, args.repeat, nowait))
            print()
        print("summary (product events/s, ratio to the raw baseline of the same run):")
        for result in results:
            note = ""
            if result["name"].startswith("fsync=batch (single"):
                verdict = "met" if result["ratio"] >= TARGET_BATCH_RATIO else "MISSED"
                note = f"  target >= {TARGET_BATCH_RATIO:.0%} of raw: {verdict}"
            print(f"  {result['name']:<37} {result['producers']:>3} x {result['per_append']:<5}"
                  f" {result['product'].rate:>10,.0f} ev/s  ratio {result['ratio']:.2f}{note}")
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        if args.profile:
            print()
            await profile(root, events)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

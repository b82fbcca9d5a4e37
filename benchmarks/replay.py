"""Replay speed of the file log into ``State``, as a ratio to a raw frame decoder in the same run.

    python benchmarks/replay.py [--events N] [--snapshot-at P] [--repeat R] [--dir PATH]
                                [--cold] [--profile]

Writes an N-event log of the realistic mix (benchmarks/workload.py: conversations of 3 hops,
each message a MessageAccepted with a ~600-byte envelope + MessageDelivered +
HandlerSucceeded, a ThreadCompleted per thread) with fsync="never" and large batches into a
temporary directory, saves a snapshot of the state at position P (default N - N/100, i.e.
990,000 of 1,000,000), then times, ``--repeat`` times each (medians reported):

- product from zero: ``open_file_log(readonly=True)`` + ``replay(log)`` into a new ``State``;
- product from the snapshot: open + ``restore(log)`` + ``replay(log, state=...)``;
- RAW BASELINE from zero: read the same segment files and decode every frame with struct,
  zlib.crc32 and msgspec into the same event classes, no fold;
- RAW BASELINE from the snapshot: read and decode the same snapshot file into ``State`` and
  raw-decode the frames after its position (seeking to the offset the snapshot records).

Also printed, to show where the time goes: the product's reader alone (``log.read()`` with no
fold). Targets (the issue): 1M events from zero in under 5 s, from a recent snapshot in under
0.5 s. Nothing here asserts a time. The log is read from the page cache unless ``--cold``
(which asks the kernel to drop these files' cached pages before each timed run).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload  # noqa: E402

from xml_pipeline.events import CATALOGUE  # noqa: E402
from xml_pipeline.log.file import open_file_log  # noqa: E402
from xml_pipeline.log.file.segments import HEADER, HEADER_SIZE, segments  # noqa: E402
from xml_pipeline.state import State, replay, restore  # noqa: E402

T = TypeVar("T")
TARGET_FROM_ZERO = 5.0  # seconds for 1,000,000 events
TARGET_FROM_SNAPSHOT = 0.5
TARGET_EVENTS = 1_000_000
WRITE_BATCH = 10_000

_DECODERS = {name.encode("ascii"): msgspec.json.Decoder(cls) for name, cls in CATALOGUE.items()}


# ------------------------------------------------------------------ the raw baseline


def raw_decode(buf: bytes, offset: int = 0) -> int:
    """Check and decode every frame of ``buf`` from ``offset``: the bare minimum, no fold."""
    unpack, crc32, decoders = HEADER.unpack_from, zlib.crc32, _DECODERS
    view = memoryview(buf)
    size = len(buf)
    count = 0
    while offset < size:
        _, _, type_len, crc, _, data_len, _, _, _ = unpack(buf, offset)
        start = offset + HEADER_SIZE
        end = start + type_len + data_len
        if crc32(view[offset + 8: end]) != crc:
            raise ValueError(f"bad frame at offset {offset}")
        decoders[buf[start: start + type_len]].decode(view[start + type_len: end])
        count += 1
        offset = end
    return count


def raw_from_zero(directory: Path) -> int:
    count = 0
    for _, path in segments(directory):
        count += raw_decode(path.read_bytes())
    return count


class _SnapshotFile(msgspec.Struct):
    version: int
    position: int
    segment: str
    offset: int
    chain_hash: str
    state: State


def raw_from_snapshot(directory: Path) -> tuple[int, int]:
    """Decode the newest snapshot file into State, then raw-decode the frames after it."""
    newest = sorted((directory / "snapshots").glob("*.snapshot"))[-1]
    snapshot = msgspec.json.decode(newest.read_bytes(), type=_SnapshotFile)
    count = 0
    for _, path in segments(directory):
        if path.name < snapshot.segment:
            continue
        with open(path, "rb") as handle:
            if path.name == snapshot.segment:
                handle.seek(snapshot.offset)
                buf = handle.read()
                skip = HEADER_SIZE + buf[3] + HEADER.unpack_from(buf)[5]  # the snapshot's own
                count += raw_decode(buf, skip)
            else:
                count += raw_decode(handle.read())
    return snapshot.state.position, count


# ------------------------------------------------------------------ the product


async def product_from_zero(directory: Path) -> tuple[State, float]:
    started = time.perf_counter()
    log = await open_file_log(directory, readonly=True)
    opened = time.perf_counter() - started
    try:
        return await replay(log), opened
    finally:
        await log.aclose()


async def product_from_snapshot(directory: Path) -> tuple[State, int]:
    # As the pump does it: open the log, then load the snapshot, which tells the log where
    # the snapshot's record is so that the replay of the rest starts there.
    log = await open_file_log(directory, readonly=True)
    state = await restore(log)
    if state is None:
        await log.aclose()
        raise SystemExit("the snapshot was not accepted by restore()")
    start = state.position
    try:
        return await replay(log, state=state), start
    finally:
        await log.aclose()


async def reader_only(directory: Path) -> int:
    log = await open_file_log(directory, readonly=True)
    count = 0
    try:
        async for _ in log.read():
            count += 1
    finally:
        await log.aclose()
    return count


# ------------------------------------------------------------------ setup


async def write_log(directory: Path, count: int, snapshot_at: int) -> tuple[float, State]:
    """Write the log; fold the first ``snapshot_at`` events into the state to snapshot."""
    state = State()
    log = await open_file_log(directory, fsync="never")
    started = time.perf_counter()
    batch: list = []
    position = 0
    try:
        for event in workload.events(count):
            batch.append(event)
            position += 1
            if position <= snapshot_at:
                state.apply(position, event)
            if len(batch) == WRITE_BATCH:
                await log.append(batch)
                batch = []
        if batch:
            await log.append(batch)
    finally:
        await log.aclose()
    return time.perf_counter() - started, state


async def save_snapshot(directory: Path, state: State) -> tuple[float, Path]:
    """Have the log keep ``state`` as a snapshot (encode it, then ``log.snapshots.save``):
    the seconds that took, and the snapshot's file."""
    log = await open_file_log(directory, readonly=True)
    try:
        started = time.perf_counter()
        saved = await log.snapshots.save(state.position, state.encode())
        seconds = time.perf_counter() - started
    finally:
        await log.aclose()
    if not saved:
        raise SystemExit("the log refused the snapshot")
    return seconds, directory / "snapshots" / f"{state.position:020d}.snapshot"


def evict(directory: Path) -> None:
    """Drop the page-cache pages of the log's files (for --cold)."""
    for path in [p for _, p in segments(directory)] + list((directory / "snapshots").glob("*")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it starts afresh at exec)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


async def _atimed(coro: Awaitable[T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = await coro
    return time.perf_counter() - started, result


async def probe(side: str, directory: Path) -> None:
    """One timed restart from the snapshot in this fresh process; prints JSON."""
    gc.collect()
    started = time.perf_counter()
    if side == "product":
        state, _ = await product_from_snapshot(directory)
        position = state.position
    else:
        position, _ = raw_from_snapshot(directory)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "position": position,
                      "maxrss_mb": peak_rss_mb()}))


def restart(side: str, directory: Path, cold: bool) -> dict:
    if cold:
        evict(directory)
    out = subprocess.run([sys.executable, __file__, "--probe", side, "--dir", str(directory)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _verdict(seconds: float, target: float, events: int) -> str:
    if events != TARGET_EVENTS:
        return f"(target {target} s is for {TARGET_EVENTS:,} events; not judged at {events:,})"
    return f"target < {target} s: {'met' if seconds < target else 'MISSED'}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=TARGET_EVENTS)
    parser.add_argument("--snapshot-at", type=int, default=None,
                        help="position of the snapshot (default: events - events/100)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (median kept)")
    parser.add_argument("--dir", default=None, help="where the temporary log goes")
    parser.add_argument("--cold", action="store_true",
                        help="drop the log's pages from the page cache before each timed run")
    parser.add_argument("--profile", action="store_true",
                        help="also run the product's replay from zero under cProfile")
    parser.add_argument("--probe", choices=("product", "raw"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:  # internal: one restart from the snapshot of the log in --dir
        await probe(args.probe, Path(args.dir))
        return
    count = args.events
    snapshot_at = args.snapshot_at if args.snapshot_at is not None else count - count // 100
    if not 1 <= snapshot_at <= count:
        raise SystemExit("--snapshot-at must be within the log")

    root = Path(tempfile.mkdtemp(prefix="xp-bench-replay-", dir=args.dir))
    directory = root / "log"
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus; "
          f"log in {directory}{' (cold: page cache dropped before each run)' if args.cold else ''}")
    print("load average at start: {:.2f} {:.2f} {:.2f} (other work on the machine skews the "
          "absolute figures; the ratios are the comparable part)".format(*os.getloadavg()))
    try:
        seconds, snap_state = await write_log(directory, count, snapshot_at)
        listing = segments(directory)
        size = sum(path.stat().st_size for _, path in listing)
        print(f"wrote {count:,} events ({size / 1e6:,.0f} MB in {len(listing)} segments) "
              f"in {seconds:.1f} s with fsync=never, {WRITE_BATCH:,}-event appends")
        save_seconds, path = await save_snapshot(directory, snap_state)
        print(f"snapshot at position {snapshot_at:,}: {path.stat().st_size / 1e6:,.1f} MB, "
              f"saved in {save_seconds:.2f} s ({len(snap_state.threads.messages):,} messages, "
              f"{len(snap_state.threads.threads):,} threads in the state)")
        del snap_state

        runs: dict[str, list[float]] = {k: [] for k in
                                        ("raw0", "zero", "open", "reader", "raws", "snap")}
        checks: dict[str, Any] = {}
        for index in range(args.repeat):
            order = ["raw0", "zero", "reader", "raws", "snap"]
            if index % 2:
                order = ["zero", "raw0", "reader", "snap", "raws"]
            for name in order:
                if args.cold:
                    evict(directory)
                gc.collect()
                if name == "raw0":
                    seconds, checks["raw0"] = _timed(raw_from_zero, directory)
                elif name == "zero":
                    seconds, (state, opened) = await _atimed(product_from_zero(directory))
                    runs["open"].append(opened)
                    checks["zero"] = state.position
                    if index == 0:
                        checks["digest"] = state.digest()
                        checks["threads"] = Counter(t.status for t in
                                                    state.threads.threads.values())
                    del state
                elif name == "reader":
                    seconds, checks["reader"] = await _atimed(reader_only(directory))
                elif name == "raws":
                    seconds, checks["raws"] = _timed(raw_from_snapshot, directory)
                else:
                    seconds, (state, start) = await _atimed(product_from_snapshot(directory))
                    checks["snap"] = (start, state.position)
                    if index == 0:
                        checks["snap_digest"] = state.digest()
                    del state
                runs[name].append(seconds)

        # A restart pays the snapshot decode on a fresh heap: time that in new processes too.
        fresh: dict[str, list[dict]] = {"raw": [], "product": []}
        for index in range(args.repeat):
            for side in (("raw", "product") if index % 2 == 0 else ("product", "raw")):
                fresh[side].append(restart(side, directory, args.cold))
        assert all(r["position"] == snapshot_at for r in fresh["raw"])
        assert all(r["position"] == count for r in fresh["product"])

        assert checks["raw0"] == count and checks["zero"] == count
        assert checks["reader"] == count, checks["reader"]
        assert checks["snap"] == (snapshot_at, count), checks["snap"]
        assert checks["raws"] == (snapshot_at, count - snapshot_at), checks["raws"]
        same = checks["digest"] == checks["snap_digest"]
        med = {name: statistics.median(values) for name, values in runs.items()}
        tail = count - snapshot_at

        def row(label: str, name: str, events: int) -> None:
            values = runs[name]
            rate = events / med[name] if med[name] else float("inf")
            print(f"  {label:<44} {med[name]:8.3f} s  (runs {min(values):.3f}-"
                  f"{max(values):.3f})  {rate:>11,.0f} ev/s")

        print(f"\nfrom zero ({count:,} events; threads at the end: "
              f"{dict(checks['threads'])}):")
        row("raw: read + struct/crc32/msgspec decode", "raw0", count)
        row("product: log.read() only, no fold", "reader", count)
        row("product: open + replay into State", "zero", count)
        print(f"    of which open_file_log(readonly=True)        {med['open']:8.3f} s")
        print(f"  ratio product/raw = {med['zero'] / med['raw0']:.2f} (time; "
              f"reader alone {med['reader'] / med['raw0']:.2f})   "
              f"{_verdict(med['zero'], TARGET_FROM_ZERO, count)}")
        print(f"\nfrom the snapshot at {snapshot_at:,} ({tail:,} events after it):")
        row("raw: decode snapshot file + raw-decode tail", "raws", tail)
        row("product: open + restore + replay", "snap", tail)
        print(f"  ratio product/raw = {med['snap'] / med['raws']:.2f} (time)   "
              f"{_verdict(med['snap'], TARGET_FROM_SNAPSHOT, count)}")
        print(f"  state from the snapshot equals the state from zero: {same}")
        raw_fresh = statistics.median(r["seconds"] for r in fresh["raw"])
        product_fresh = statistics.median(r["seconds"] for r in fresh["product"])
        print("\nfrom the snapshot in a fresh process each time (a restart; imports excluded):")
        for label, side, median in (("raw: decode snapshot file + raw-decode tail", "raw",
                                     raw_fresh),
                                    ("product: open + restore + replay", "product",
                                     product_fresh)):
            values = [r["seconds"] for r in fresh[side]]
            rss = max(r["maxrss_mb"] for r in fresh[side])
            print(f"  {label:<44} {median:8.3f} s  (runs {min(values):.3f}-{max(values):.3f})"
                  f"  peak RSS {rss:,.0f} MB")
        print(f"  ratio product/raw = {product_fresh / raw_fresh:.2f} (time)   "
              f"{_verdict(product_fresh, TARGET_FROM_SNAPSHOT, count)}")
        print(f"\npeak RSS of this process: {peak_rss_mb():,.0f} MB")
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

        if args.profile:
            print("\ncProfile of the product's replay from zero (top 25 by own time):")
            profiler = cProfile.Profile()
            log = await open_file_log(directory, readonly=True)
            profiler.enable()
            await replay(log)
            profiler.disable()
            await log.aclose()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            print("cProfile of the product's replay from the snapshot (top 15 by own time):")
            profiler = cProfile.Profile()
            profiler.enable()
            await product_from_snapshot(directory)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

"""Commands on a log directory: ``replay`` (with ``--verify``) rebuilds the state from it and
summarises it, ``repair`` moves a damaged part aside so that it opens again. (``tail`` is in
``tail.py``, since it also follows a running organism over HTTP.)"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from xml_pipeline.cli.defaults import data_dir
from xml_pipeline.config import LogConfig
from xml_pipeline.errors import LogError
from xml_pipeline.log import open_log
from xml_pipeline.log.file import repair_log, verify_log
from xml_pipeline.state import State, restore

__all__ = ["repair", "replay"]


def _state_summary(state: State, counts: Counter[str]) -> dict[str, Any]:
    threads = Counter(t.status for t in state.threads.threads.values())
    usage = state.budgets.usage
    return {
        "position": state.position,
        "events": dict(sorted(counts.items())),
        "organism": state.agents.name,
        "threads": dict(sorted(threads.items())),
        "messages": state.threads.accepted,
        "rejected": state.threads.rejected,
        "dead_letters": len(state.threads.dead_letters),
        "agents": {name: info.status for name, info in state.agents.agents.items()},
        "tokens": {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens,
                   "requests": usage.request_count, "cost": round(usage.total_cost, 6)},
        "digest": state.digest(),
    }


def _verify(directory: Path, args: argparse.Namespace) -> bool:
    """``replay --verify``: the deep check of every record and snapshot; False if it fails."""
    result = verify_log(directory)
    snapshots = [f"snapshots/{name}: {problem}" for name, problem in result.snapshots]
    if not result.ok or snapshots:
        advice = (f"Run 'xml-pipeline repair --data {directory}' to move the damaged part "
                  "aside (it is kept, not deleted), or restore the log from a copy.")
        if args.json:
            print(json.dumps({"ok": False, "bad_position": result.bad_position,
                              "problem": result.problem, "segment": result.segment,
                              "offset": result.offset if result.segment else None,
                              "intact_records": result.records, "snapshots": snapshots}))
        elif not result.ok:
            print(f"The log at {directory} is damaged at position {result.bad_position}: "
                  f"{result.problem}. {result.records} records before it are intact. "
                  f"{advice}", file=sys.stderr)
        for problem in snapshots if not args.json else ():
            print(f"The log at {directory} contradicts a snapshot: {problem}. {advice}",
                  file=sys.stderr)
        return False
    if not args.json:
        tail = (f" ({result.torn_bytes} incomplete bytes at the end: a write in progress "
                "or a torn tail, cut when the log is next opened for writing)"
                if result.torn_bytes else "")
        print(f"verified {result.records} records: checksums and hash chain intact{tail}")
    return True


async def replay(args: argparse.Namespace) -> int:
    directory = data_dir(args)
    if not directory.is_dir():
        print(f"There is no log at {directory}; pass --data DIR.", file=sys.stderr)
        return 1
    if args.verify and not _verify(directory, args):
        return 1
    try:
        log = await open_log(LogConfig(path=directory), readonly=True)
    except LogError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    try:
        state = None if args.no_snapshot else await restore(log)
        start = state.position if state else 0
        counts: Counter[str] = Counter()
        result_state = state or State()
        show_progress = sys.stderr.isatty() and not args.json
        async for record in log.read(after=start):
            result_state.apply(record.position, record.event)
            counts[type(record.event).__name__] += 1
            if show_progress and record.position % 100_000 == 0:
                print(f"\r  replayed {record.position} events", end="", file=sys.stderr)
        if show_progress:
            print("\r", end="", file=sys.stderr)
        if args.snapshot:
            await log.snapshots.save(result_state.position, result_state.encode())
    except LogError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    finally:
        await log.aclose()
    summary = _state_summary(result_state, counts)
    summary["from_snapshot"] = start
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"replayed {sum(counts.values())} events"
          + (f" after the snapshot at position {start}" if start else "")
          + f"; state at position {result_state.position}")
    if summary["organism"]:
        print(f"  organism: {summary['organism']}")
    print(f"  threads:  {summary['threads'] or 'none'}")
    print(f"  messages: {summary['messages']} accepted, {summary['rejected']} rejected, "
          f"{summary['dead_letters']} dead letters")
    if summary["agents"]:
        print(f"  agents:   {summary['agents']}")
    tokens = summary["tokens"]
    print(f"  tokens:   {tokens['prompt']} in, {tokens['completion']} out, "
          f"{tokens['requests']} requests, cost {tokens['cost']}")
    print(f"  digest:   {summary['digest']}")
    return 0


async def repair(args: argparse.Namespace) -> int:
    directory = data_dir(args)
    if not directory.is_dir():
        print(f"There is no log at {directory}; pass --data DIR.", file=sys.stderr)
        return 1
    try:
        outcome = await repair_log(directory, at=time.time())
    except LogError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    event = outcome.event
    if args.json:
        print(json.dumps({"repaired": event is not None, "position": outcome.position,
                          **({} if event is None else msgspec.to_builtins(event))}))
        return 0
    if event is None:
        torn = (f"; the {outcome.torn_bytes} incomplete bytes at its end are a torn tail, "
                "which the next open for writing cuts" if outcome.torn_bytes else "")
        print(f"The log at {directory} passed the full check (every record, the hash chain "
              f"and the snapshots); nothing to repair{torn}.")
        return 0
    print(f"repaired the log at {directory}; what was moved is kept in "
          f"{directory / event.folder}")
    for problem in event.problems:
        print(f"  found: {problem}")
    for moved in event.moved:
        print(f"  moved: {moved}")
    if event.cut_at:
        print(f"  records from position {event.cut_at} on are no longer in the log")
    print(f"LogRepaired recorded at position {outcome.position}; the log opens again")
    return 0

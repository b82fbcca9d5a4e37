"""The ``xml-pipeline`` command line.

Commands read the local log directly (``--data DIR``); output is for people by default and
JSON with ``--json``. Exit status: 0 success, 1 a problem was found (invalid organism,
damaged log), 2 wrong usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import msgspec

from xml_pipeline.envelope import format_timestamp
from xml_pipeline.errors import LogError, OrganismError, XmlPipelineError
from xml_pipeline.events import CATALOGUE, Event, Recorded
from xml_pipeline.log import open_log
from xml_pipeline.log.file import repair_log, verify_log
from xml_pipeline.organism import LogConfig, Organism, load_organism
from xml_pipeline.remote import (
    Style,
    UsageError,
    budget_command,
    inject_command,
    local_organism,
    remote_command,
    tail_command,
    usage_command,
)
from xml_pipeline.state import State, restore

__all__ = ["main"]

DEFAULT_ORGANISM = "organism.yaml"
DEFAULT_DATA = ".xml-pipeline/events"
DATA_HELP = f"log directory (default: organism.yaml's, or {DEFAULT_DATA})"


# ------------------------------------------------------------------ check


def _summary(organism: Organism) -> str:
    lines = [f"organism {organism.name!r} ({organism.path}) is valid",
             f"  log:    {organism.log.url or organism.log.path} (fsync: {organism.log.fsync})",
             f"  api:    http://{organism.api.host}:{organism.api.port}/api/v1"]
    budgets = organism.budgets
    limits = [f"{k}={v}" for k, v in (("thread_tokens", budgets.thread_tokens),
                                      ("agent_tokens", budgets.agent_tokens),
                                      ("organism_tokens", budgets.organism_tokens)) if v]
    lines.append(f"  budgets: {', '.join(limits) or 'none'}")
    lines.append(f"  listeners ({len(organism.listeners)}):")
    width = max((len(n) for n in organism.listeners), default=0)
    for listener in organism.listeners.values():
        kind = f"agent {listener.agent.model}" if listener.agent else listener.handler
        peers = ", ".join(listener.peers) or "(no peers)"
        lines.append(f"    {listener.name:<{width}}  <{listener.schema.root}>  {kind}  -> {peers}")
        lines.append(f"    {'':<{width}}  {listener.description}")
    agents = [name for name, listener in organism.listeners.items() if listener.agent]
    if agents and not os.environ.get("ANTHROPIC_API_KEY"):
        lines.append(f"  warning: ANTHROPIC_API_KEY is not set, so the agents "
                     f"{', '.join(agents)} cannot call the model; set it before "
                     "'xml-pipeline run'.")
    return "\n".join(lines)


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        organism = load_organism(args.organism)
    except OrganismError as exc:
        if args.json:
            print(json.dumps({"valid": False, "problems": [
                {"file": p.file, "line": p.line, "message": p.message} for p in exc.problems]}))
        else:
            print(exc.message, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"valid": True, "name": organism.name, "listeners": [
            listener.summary() for listener in organism.listeners.values()]}))
    else:
        print(_summary(organism))
    return 0


# ------------------------------------------------------------------ data directory


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data:
        return Path(args.data)
    organism = local_organism()
    if organism is not None and organism.log.path is not None:
        return organism.log.path
    return Path(DEFAULT_DATA)


# ------------------------------------------------------------------ replay


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


async def _replay(args: argparse.Namespace) -> int:
    directory = _data_dir(args)
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


# ------------------------------------------------------------------ repair


async def _repair(args: argparse.Namespace) -> int:
    directory = _data_dir(args)
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


# ------------------------------------------------------------------ tail


def _names(event: Event) -> set[str]:
    found = set()
    for attr in ("listener", "agent", "sender", "to"):
        value = getattr(event, attr, None)
        if isinstance(value, str):
            found.add(value)
    return found


def _describe(event: Event) -> str:
    data = msgspec.to_builtins(event)
    data.pop("at", None)
    if "envelope" in data:
        data.pop("envelope")
    for key in ("source", "listeners"):
        if key in data:
            data[key] = "..."
    parts = []
    for key, value in data.items():
        if value is None or value == "" or value == []:
            continue
        text = str(value)
        if len(text) > 80:
            text = text[:77] + "..."
        parts.append(f"{key}={text}")
    return " ".join(parts)


class _Tail:
    def __init__(self, args: argparse.Namespace, out: TextIO) -> None:
        self.args = args
        self.out = out
        self.style = Style(out)
        self.thread_of: dict[str, str] = {}

    def wanted(self, record: Recorded) -> bool:
        event = record.event
        thread_id = getattr(event, "thread_id", None)
        message_id = getattr(event, "message_id", None)
        if isinstance(message_id, str) and isinstance(thread_id, str):
            self.thread_of[message_id] = thread_id
        elif isinstance(message_id, str):
            thread_id = self.thread_of.get(message_id)
        if record.position <= (self.args.after or 0):
            return False
        if self.args.type and type(event).__name__ not in self.args.type:
            return False
        if self.args.thread and thread_id != self.args.thread:
            return False
        return not (self.args.agent and self.args.agent not in _names(event))

    def show(self, record: Recorded) -> None:
        event = record.event
        if self.args.json:
            line = {"position": record.position, "type": type(event).__name__,
                    "at": format_timestamp(event.at), "data": msgspec.to_builtins(event)}
            self.out.write(json.dumps(line) + "\n")
        else:
            name = type(event).__name__
            colour = "31" if ("Rejected" in name or "Failed" in name or "Dead" in name
                              or "Killed" in name or "Exhausted" in name) else "36"
            self.out.write(f"{self.style(f'#{record.position}', '2')} "
                           f"{format_timestamp(event.at)} {self.style(name, colour)} "
                           f"{_describe(event)}\n")
        self.out.flush()


async def _tail(args: argparse.Namespace) -> int:
    directory = _data_dir(args)
    if not args.follow and not directory.is_dir():
        print(f"There is no log at {directory}; pass --data DIR.", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    tail = _Tail(args, sys.stdout)
    try:
        log = await open_log(LogConfig(path=directory), readonly=True)
    except LogError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    if args.lines is not None:  # the last N records (filters then apply to them)
        args.after = max(0, log.last_position - args.lines)
    # Filtering by thread needs the message -> thread map from the start of the log.
    start = 0 if args.thread else (args.after or 0)
    try:
        source = log.follow(after=start) if args.follow else log.read(after=start)
        async for record in source:
            if tail.wanted(record):
                tail.show(record)
    except LogError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    finally:
        await log.aclose()
    return 0


# ------------------------------------------------------------------ run and inject


def _inject_hint(organism: Organism, host: str, port: int) -> str:
    """An inject command for the first listener that works as pasted, from any directory."""
    import shlex

    from xml_pipeline.client import default_url

    first = next(iter(organism.listeners.values()))
    payload = " ".join(line.strip() for line in first.schema.example().splitlines())
    payload = payload.replace("> <", "><")
    url = default_url(host, port) if "XML_PIPELINE_URL" not in os.environ else None
    url = url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    return (f"xml-pipeline inject --url {shlex.quote(url)} --to {shlex.quote(first.name)} "
            f"{shlex.quote(payload)}")


def _cmd_run(args: argparse.Namespace) -> int:
    from xml_pipeline.api.server import run_until_complete

    return run_until_complete(_run(args), loop=args.loop)


async def _run(args: argparse.Namespace) -> int:
    """Exit status: 0 stopped, 1 the organism or its log is invalid, 2 the address cannot be
    taken. A startup failure is one line on standard error, and records nothing."""
    import logging

    from xml_pipeline.api.auth import TOKEN_ENV
    from xml_pipeline.api.server import CannotBindError, UnsafeBindError, serve

    try:
        organism = load_organism(args.organism)
    except OrganismError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = Path(args.data) if args.data else organism.log.path
    if data is None:
        print("This organism logs to NATS, which arrives in a later version; give --data DIR.",
              file=sys.stderr)
        return 1
    # Precedence: command-line flag > environment > organism.yaml > default.
    host = args.host or os.environ.get("XML_PIPELINE_HOST") or organism.api.host
    port = args.port if args.port is not None else int(
        os.environ.get("XML_PIPELINE_PORT", organism.api.port))
    print(f"organism {organism.name!r}: {len(organism.listeners)} listeners, log {data}, "
          f"API http://{host}:{port}/api/v1", flush=True)
    print(f"inject with: {_inject_hint(organism, host, port)}", flush=True)
    try:
        await serve(organism, host=host, port=port, data=data,
                    token=os.environ.get(TOKEN_ENV) or None, access_log=not args.no_access_log,
                    watch=not args.no_watch)
    except (UnsafeBindError, CannotBindError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except XmlPipelineError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print("stopped", flush=True)
    return 0


# ------------------------------------------------------------------ entry point


def _whole(low: int, high: int | None = None) -> Any:
    """An argparse type: a whole number from ``low`` (to ``high``), said in the CLI's words."""
    def parse(text: str) -> int:
        span = f"from {low} to {high}" if high is not None else f"of {low} or more"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, not {text!r}"
                                             ) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, not {value}")
        return value
    return parse


def _tail_command(args: argparse.Namespace) -> int:
    unknown = [t for t in args.type or () if t not in CATALOGUE]
    if unknown:
        print(f"Unknown event type(s): {', '.join(unknown)}. Known: "
              f"{', '.join(sorted(CATALOGUE))}.", file=sys.stderr)
        return 2
    if args.no_follow and not args.url:
        print("--no-follow goes with --url; a log directory is followed only with -f.",
              file=sys.stderr)
        return 2
    return tail_command(args) if args.url else asyncio.run(_tail(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xml-pipeline",
        description="An event-sourced, actor-style message bus with XML envelopes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate organism.yaml and summarise it")
    check.add_argument("organism", nargs="?", default=DEFAULT_ORGANISM)
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(run=_cmd_check)

    run = commands.add_parser("run", help="run the organism: pump and HTTP API")
    run.add_argument("organism", nargs="?", default=DEFAULT_ORGANISM)
    run.add_argument("--data", help="log directory (default: organism.yaml's log.path)")
    run.add_argument("--host", help="API address (env XML_PIPELINE_HOST; default organism.yaml)")
    run.add_argument("--port", type=int, help="API port (env XML_PIPELINE_PORT)")
    run.add_argument("--no-access-log", action="store_true", help="do not log each request")
    run.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                     help="event loop (default asyncio: uvloop serves more, but starves some "
                          "clients under a flood; see docs/benchmarks.md)")
    run.add_argument("--no-watch", action="store_true",
                     help="do not reload when organism.yaml, its XSDs or handlers change")
    run.set_defaults(run=_cmd_run)

    inject = commands.add_parser("inject", help="send a message to a running organism")
    inject.add_argument("--to", help="listener name (omit if PAYLOAD is a full envelope)")
    inject.add_argument("--thread", help="continue this thread")
    inject.add_argument("--idempotency-key", help="the same key returns the original ids")
    inject.add_argument("--url", help="the organism's address (default: organism.yaml's api, "
                                      "or env XML_PIPELINE_URL)")
    inject.add_argument("--json", action="store_true", help="machine-readable output")
    inject.add_argument("payload", help="XML text, @file, or - for standard input")
    inject.set_defaults(run=inject_command)

    url_help = "the organism's address (default: organism.yaml's api, or env XML_PIPELINE_URL)"
    reload = commands.add_parser("reload", help="reload organism.yaml in a running organism")
    reload.add_argument("--url", help=url_help)
    reload.add_argument("--json", action="store_true", help="machine-readable output")
    reload.set_defaults(run=remote_command)
    threads = commands.add_parser("threads", help="list the threads of a running organism")
    threads.add_argument("--status", choices=["active", "completed", "failed", "killed",
                                              "paused"])
    threads.add_argument("--agent", help="only threads this listener took part in")
    threads.add_argument("--limit", type=_whole(1, 1000), default=50, help="at most this many "
                         "(1 to 1000)")
    threads.add_argument("--url", help=url_help)
    threads.add_argument("--json", action="store_true", help="machine-readable output")
    threads.set_defaults(run=remote_command)
    dead = commands.add_parser("dead-letters", help="list dead-lettered messages")
    dead.add_argument("--limit", type=_whole(1, 1000), default=50,
                      help="at most this many (1 to 1000)")
    dead.add_argument("--url", help=url_help)
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    dead.set_defaults(run=remote_command)

    budget = commands.add_parser(
        "budget", help="set a token budget; the threads it held go on",
        description="Set a token budget: THREAD sets the thread's, THREAD --agent NAME that "
                    "agent's in the thread, --agent NAME the agent's across all threads, "
                    "--organism the organism's. Says which threads go on and what still "
                    "holds the others.")
    budget.add_argument("thread", nargs="?", help="the thread id")
    budget.add_argument("--agent", help="the agent (in THREAD, or across all threads)")
    budget.add_argument("--organism", action="store_true", help="the organism's budget")
    budget.add_argument("--max-tokens", required=True, metavar="N",
                        help="the new limit, a whole number from 1 to 10^12")
    budget.add_argument("--url", help=url_help)
    budget.add_argument("--json", action="store_true", help="machine-readable output")
    budget.set_defaults(run=budget_command)

    usage = commands.add_parser("usage", help="token usage and budgets (gas gauges)")
    usage.add_argument("--threads", type=_whole(1, 1000), default=10,
                       help="how many threads to show (1 to 1000)")
    usage.add_argument("--url", help=url_help)
    usage.add_argument("--json", action="store_true", help="machine-readable output")
    usage.set_defaults(run=usage_command)

    rep = commands.add_parser("replay", help="rebuild state from the log and summarise it")
    rep.add_argument("--data", help=DATA_HELP)
    rep.add_argument("--verify", action="store_true",
                     help="check every checksum, the whole hash chain and the snapshots first")
    rep.add_argument("--no-snapshot", action="store_true", help="replay from position 0")
    rep.add_argument("--snapshot", action="store_true", help="save a snapshot afterwards")
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.set_defaults(run=lambda a: asyncio.run(_replay(a)))
    fix = commands.add_parser("repair", help="move the damaged part of the log aside (kept, "
                                             "not deleted) so that it opens again")
    fix.add_argument("--data", help=DATA_HELP)
    fix.add_argument("--json", action="store_true", help="machine-readable output")
    fix.set_defaults(run=lambda a: asyncio.run(_repair(a)))

    tail = commands.add_parser("tail", help="print the event log (and follow it with -f)")
    tail.add_argument("--data", help=DATA_HELP)
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    tail.add_argument("--thread", help="only events of this thread")
    tail.add_argument("--agent", help="only events naming this listener")
    tail.add_argument("--type", action="append", help="only events of this type (repeatable)")
    start = tail.add_mutually_exclusive_group()
    start.add_argument("--after", type=_whole(0), default=None, metavar="POSITION",
                       help="start after this position (default: the start of a log directory; "
                            "with --url, only new events)")
    start.add_argument("-n", "--lines", type=_whole(1), default=None, metavar="N",
                       help="start with the last N records of the log (filters apply to them)")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--url", help="follow a running organism over its API (always follows, "
                                    "reconnecting when it goes away)")
    tail.add_argument("--no-follow", action="store_true",
                      help="with --url: exit with status 1 when the organism goes away "
                           "instead of reconnecting")
    tail.set_defaults(run=_tail_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as exc:
        print(f"xml-pipeline {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0

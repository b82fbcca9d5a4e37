"""The ``xml-pipeline`` command line: the parser and ``main``.

Commands read the local log directly (``--data DIR``: ``local``, ``tail``) or talk to a
running organism (``--url``: ``remote``, ``tail``); ``organism`` checks and runs an organism
file. Output is for people by default and JSON with ``--json``. Exit status: 0 success, 1 a
problem was found (invalid organism, damaged log), 2 wrong usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from xml_pipeline.cli.defaults import DEFAULT_DATA, DEFAULT_ORGANISM
from xml_pipeline.cli.local import repair, replay
from xml_pipeline.cli.organism import check_command, run_command
from xml_pipeline.cli.remote import (
    UsageError,
    budget_command,
    inject_command,
    remote_command,
    usage_command,
)
from xml_pipeline.cli.tail import tail_command

__all__ = ["main"]

DATA_HELP = f"log directory (default: organism.yaml's, or {DEFAULT_DATA})"


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xml-pipeline",
        description="An event-sourced, actor-style message bus with XML envelopes.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate organism.yaml and summarise it")
    check.add_argument("organism", nargs="?", default=DEFAULT_ORGANISM)
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(run=check_command)

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
    run.set_defaults(run=run_command)

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
    rep.set_defaults(run=lambda a: asyncio.run(replay(a)))
    fix = commands.add_parser("repair", help="move the damaged part of the log aside (kept, "
                                             "not deleted) so that it opens again")
    fix.add_argument("--data", help=DATA_HELP)
    fix.add_argument("--json", action="store_true", help="machine-readable output")
    fix.set_defaults(run=lambda a: asyncio.run(repair(a)))

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
    tail.set_defaults(run=tail_command)
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

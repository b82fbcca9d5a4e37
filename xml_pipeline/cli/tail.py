"""``tail``: print the event log, from a log directory (``--data``, followed with ``-f``) or
from a running organism over its API (``--url``, reconnecting when it goes away)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, TextIO

import msgspec

from xml_pipeline.cli.defaults import data_dir
from xml_pipeline.cli.remote import api_url
from xml_pipeline.config import LogConfig
from xml_pipeline.envelope import format_timestamp
from xml_pipeline.errors import LogError
from xml_pipeline.events import CATALOGUE, Event, Recorded
from xml_pipeline.log import open_log

__all__ = ["RECONNECT_FIRST", "RECONNECT_MAX", "Style", "tail_command"]


class Style:
    def __init__(self, stream: TextIO) -> None:
        self.on = stream.isatty() and os.environ.get("NO_COLOR") is None

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text


def tail_command(args: argparse.Namespace) -> int:
    unknown = [t for t in args.type or () if t not in CATALOGUE]
    if unknown:
        print(f"Unknown event type(s): {', '.join(unknown)}. Known: "
              f"{', '.join(sorted(CATALOGUE))}.", file=sys.stderr)
        return 2
    if args.no_follow and not args.url:
        print("--no-follow goes with --url; a log directory is followed only with -f.",
              file=sys.stderr)
        return 2
    return _follow_url(args) if args.url else asyncio.run(_tail(args))


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
    directory = data_dir(args)
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


#: Seconds between attempts to reach an organism that went away, doubling up to the maximum.
RECONNECT_FIRST = 0.25
RECONNECT_MAX = 5.0


def _show(item: dict[str, Any], json_lines: bool, out: TextIO, style: Style) -> None:
    if json_lines:
        out.write(json.dumps(item) + "\n")
    else:
        data = {k: v for k, v in item["data"].items() if k != "at"}
        text = " ".join(f"{k}={str(v)[:80]}" for k, v in data.items()
                        if v not in (None, "", []) and k not in
                        ("envelope", "source", "listeners"))
        out.write(f"{style('#' + str(item['position']), '2')} {item['at']} "
                  f"{style(item['type'], '36')} {text}\n")
    out.flush()


def _follow_url(args: argparse.Namespace) -> int:
    """Follow a running organism's events. When it goes away (stopped, restarted, network)
    this says so on standard error and reconnects from the last position it printed, until
    interrupted; with ``--no-follow`` it exits with status 1 instead."""
    from xml_pipeline.cli.client import Client, ClientError

    out, style = sys.stdout, Style(sys.stdout)
    url = api_url(args)
    after: int | None = args.after
    delay, lost = RECONNECT_FIRST, False

    def opened() -> None:
        nonlocal delay, lost
        if lost:
            print(f"Reconnected to {url}; resuming after #{after}.", file=sys.stderr,
                  flush=True)
        delay, lost = RECONNECT_FIRST, False

    with Client(url) as client:
        while True:
            try:
                if after is None:  # only new events, or the last -n of them
                    after = max(0, int(client.get("/organism")["position"]) - (args.lines or 0))
                for item in client.events(after=after, thread=args.thread, agent=args.agent,
                                          types=args.type, on_open=opened):
                    if "error" in item:  # the log is damaged there: reading on fails again
                        print(f"{item['error']['message']} (the stream stopped after "
                              f"#{item['error']['after']})", file=sys.stderr)
                        return 1
                    if "position" not in item:  # a lagging notice: resume where it says
                        after = int(item["after"])
                        raise ClientError(0, "lagging", str(item.get("message")))
                    after = int(item["position"])
                    _show(item, args.json, out, style)
                reason = f"The organism at {url} ended the stream (it stopped)"
            except ClientError as exc:
                if 0 < exc.status < 500:  # refused: trying again gives the same answer
                    print(exc.message, file=sys.stderr)
                    return 1
                reason = exc.message.rstrip(".")
            if args.no_follow:
                print(f"{reason}; not reconnecting (--no-follow).", file=sys.stderr)
                return 1
            if not lost:
                print(f"{reason}; reconnecting to resume after #{after} (Ctrl-C to stop).",
                      file=sys.stderr, flush=True)
                lost = True
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

"""CLI commands that talk to a running organism over its HTTP API.

They find it with ``--url``, else ``XML_PIPELINE_URL``, else the ``api`` of ``./organism.yaml``
(with ``XML_PIPELINE_HOST``/``XML_PIPELINE_PORT`` taking precedence), else 127.0.0.1:8765.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from xml_pipeline.config import Organism, load_organism
from xml_pipeline.errors import OrganismError

__all__ = ["RECONNECT_FIRST", "RECONNECT_MAX", "Style", "UsageError", "budget_command",
           "inject_command", "local_organism", "remote_command", "tail_command", "usage_command"]

DEFAULT_ORGANISM = "organism.yaml"


def local_organism() -> Organism | None:
    """The organism of ``./organism.yaml`` if there is a valid one (for default paths and
    addresses), else None."""
    organism_file = Path(DEFAULT_ORGANISM)
    if not organism_file.exists():
        return None
    try:
        return load_organism(organism_file)
    except OrganismError:
        return None


class Style:
    def __init__(self, stream: TextIO) -> None:
        self.on = stream.isatty() and os.environ.get("NO_COLOR") is None

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text


def _read_payload(text: str) -> str:
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@"):
        return Path(text[1:]).read_text(encoding="utf-8")
    return text


class UsageError(Exception):
    """A command-line value that cannot work; the message says why (exit status 2)."""


def _url(args: argparse.Namespace) -> str:
    from xml_pipeline.client import default_url, organism_url

    try:
        if args.url:
            return organism_url(str(args.url))
        organism = local_organism()
        if organism is not None:
            return default_url(organism.api.host, organism.api.port)
        return default_url()
    except ValueError as exc:
        source = "--url" if args.url else "XML_PIPELINE_URL"
        raise UsageError(f"{source}: {exc}") from None


def inject_command(args: argparse.Namespace) -> int:
    from xml_pipeline.client import Client, ClientError

    try:
        payload = _read_payload(args.payload)
    except OSError as exc:
        print(f"Cannot read the payload: {exc}.", file=sys.stderr)
        return 2
    if not payload.strip():
        raise UsageError("the payload is empty: give XML text, @FILE, or - to read standard "
                         "input.")
    if args.idempotency_key is not None and not args.idempotency_key:
        raise UsageError("--idempotency-key must not be empty (leave it out for none).")
    try:
        with Client(_url(args)) as client:
            answer = client.inject(to=args.to, payload=payload, thread_id=args.thread,
                                   idempotency_key=args.idempotency_key)
    except ClientError as exc:
        if args.json:
            print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        else:
            print(f"rejected ({exc.code}): {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"accepted message {answer['message_id']} in thread {answer['thread_id']}")
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


def tail_command(args: argparse.Namespace) -> int:
    """Follow a running organism's events. When it goes away (stopped, restarted, network)
    this says so on standard error and reconnects from the last position it printed, until
    interrupted; with ``--no-follow`` it exits with status 1 instead."""
    from xml_pipeline.client import Client, ClientError

    out, style = sys.stdout, Style(sys.stdout)
    url = _url(args)
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


def remote_command(args: argparse.Namespace) -> int:
    """reload / threads / dead-letters against a running organism."""
    from xml_pipeline.client import Client, ClientError

    try:
        with Client(_url(args)) as client:
            if args.command == "reload":
                result = client.post("/organism/reload")
            elif args.command == "threads":
                result = client.get("/threads", status=args.status, agent=args.agent,
                                    limit=args.limit)
            else:
                result = client.get("/dead-letters", limit=args.limit)
    except ClientError as exc:
        if args.json:
            print(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        else:
            print(exc.message, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    if args.command == "reload" and not (result["added"] or result["removed"]
                                         or result["updated"] or result.get("settings")):
        print("reloaded: no change")
    elif args.command == "reload":
        none = "none"
        settings = f", changed {', '.join(result['settings'])}" if result.get("settings") else ""
        print(f"reloaded: added {result['added'] or none}, removed {result['removed'] or none}"
              f", updated {result['updated'] or none}{settings}")
    elif args.command == "threads":
        print(f"{result['count']} of {result['total']} threads")
        for t in result["threads"]:
            print(f"  {t['thread_id']}  {t['status']:<9} {t['message_count']:>4} messages  "
                  f"{t['updated_at']}  {', '.join(t['participants'])}")
    else:
        print(f"{result['total']} dead letters")
        for d in result["dead_letters"]:
            print(f"  {d['message_id']}  {d['listener']}  thread {d['thread_id']}: "
                  f"{d['reason']}")
    return 0


def _bar(used: int, limit: int | None, width: int = 24) -> str:
    if not limit:
        return "[" + " " * width + "]  no limit"
    filled = min(width, round(width * used / limit))
    percent = 100 * used / limit
    return f"[{'#' * filled}{'-' * (width - filled)}] {used}/{limit} {percent:5.1f}%"


_MAX_TOKENS = 10**12


def _whose(hold: dict[str, Any]) -> str:
    """The budget that holds a waiting call, in the CLI's words."""
    agent = hold["agent"]
    return {"thread": "the thread's budget",
            "thread-agent": f"{agent}'s budget in this thread",
            "agent": f"agent {agent}'s budget",
            "organism": "the organism's budget"}.get(hold["scope"], f"the {hold['scope']} budget")


def _raise_with(hold: dict[str, Any]) -> str:
    """The command that frees a waiting call."""
    scope, needed = hold["scope"], hold["needed"]
    target = {"thread": hold["thread_id"],
              "thread-agent": f"{hold['thread_id']} --agent {hold['agent']}",
              "agent": f"--agent {hold['agent']}",
              "organism": "--organism"}.get(scope, hold["thread_id"])
    return f"xml-pipeline budget {target} --max-tokens {needed}"


def _held_text(hold: dict[str, Any]) -> str:
    return (f"{hold['agent']}'s call needs up to {hold['requested']} tokens; {_whose(hold)} "
            f"allows {hold['limit']} ({hold['used']} used, {hold['reserved']} reserved)")


def _budget_usage(args: argparse.Namespace) -> str | None:
    """What makes a ``budget`` command line unable to work, in the CLI's words (checked
    before any request), or None."""
    if args.organism and (args.thread is not None or args.agent is not None):
        return "--organism sets the organism's budget; it takes no THREAD and no --agent."
    if args.thread is None and args.agent is None and not args.organism:
        return "Say which budget to set: a THREAD, --agent NAME, or --organism."
    if args.thread == "":
        return "THREAD must name a thread, not be empty."
    if args.agent == "":
        return "--agent must name an agent, not be empty."
    text = args.max_tokens
    digits = text.isascii() and text.isdigit()  # int() would also take "+5", " 5", "1_000"
    if digits and 1 <= int(text) <= _MAX_TOKENS:
        return None
    return (f"--max-tokens must be a whole number from 1 to 10^12, not "
            f"{int(text) if digits else repr(text)}.")


def budget_command(args: argparse.Namespace) -> int:
    """Set a budget: a thread's (THREAD), an agent's in a thread (THREAD --agent NAME), an
    agent's across all threads (--agent NAME), or the organism's (--organism). Says which
    threads go on, and what still holds those that do not."""
    from urllib.parse import quote

    from xml_pipeline.client import Client, ClientError

    problem = _budget_usage(args)
    if problem:
        raise UsageError(problem)
    max_tokens = int(args.max_tokens)
    body: dict[str, Any] = {"max_tokens": max_tokens}
    if args.thread:
        path = f"/usage/threads/{quote(args.thread, safe='')}/budget"
        if args.agent:
            body["agent"] = args.agent
    elif args.agent:
        path = f"/usage/agents/{quote(args.agent, safe='')}/budget"
    else:
        path = "/usage/organism/budget"
    try:
        with Client(_url(args)) as client:
            result = client.post(path, body)
    except ClientError as exc:
        message = exc.message
        if exc.status == 404 and args.agent and exc.message.startswith("There is no"):
            message = (f"There is no agent {args.agent!r}; 'xml-pipeline usage' lists the "
                       "agents.")
        elif exc.status == 404 and args.thread:
            message = (f"There is no thread {args.thread!r}; 'xml-pipeline threads' lists "
                       "them.")
        if args.json:
            print(json.dumps({"error": {"code": exc.code, "message": message}}))
        else:
            print(message, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
        return 0
    if args.thread:
        used = result["total_tokens"]
        if args.agent:
            used = next((g["used"] for g in result["gauges"] if g["scope"] == "thread-agent"
                         and g["agent"] == args.agent), 0)
        what = f"{args.agent} in thread {args.thread}" if args.agent else f"thread {args.thread}"
        holds = [result["still_held_by"]] if result["still_held_by"] else []
    else:
        used = result["budget"]["total_tokens"]
        what = f"agent {args.agent}" if args.agent else f"organism {result['organism']}"
        holds = result["still_held"]
    print(f"{what}: {_bar(used, max_tokens)}")
    for thread_id in result["resumed"]:
        print(f"thread {thread_id} goes on")
    for hold in holds:
        print(f"thread {hold['thread_id']} is still paused: {_held_text(hold)}. Raise it "
              f"with: {_raise_with(hold)}")
    return 0


def usage_command(args: argparse.Namespace) -> int:
    """Gas gauges: organism totals, each agent's budget, the hottest threads."""
    from xml_pipeline.client import Client, ClientError

    try:
        with Client(_url(args)) as client:
            usage = client.get("/usage")["usage"]
            agents = client.get("/agents", limit=1000)["agents"]
            per_agent = {a["name"]: client.get(f"/usage/agents/{a['name']}") for a in agents
                         if a["kind"] == "agent"}
            threads = client.get("/usage/threads", limit=args.threads)
            paused = [client.get(f"/usage/threads/{t['thread_id']}") for t in
                      client.get("/threads", status="paused", limit=args.threads)["threads"]]
    except ClientError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"usage": usage, "agents": per_agent, "threads": threads,
                          "paused": paused}))
        return 0
    totals = usage["totals"]
    print(f"usage since {usage.get('since') or 'the start'}: {totals['prompt_tokens']} in, "
          f"{totals['completion_tokens']} out, {totals['request_count']} calls, "
          f"${totals['total_cost']:.4f}, {usage['active_threads']} active threads")
    if per_agent:
        print("agents:")
        width = max(len(n) for n in per_agent)
        for name, info in per_agent.items():
            budget = info["budget"]
            print(f"  {name:<{width}} {_bar(budget['total_tokens'], budget['max_tokens'])}"
                  f"  ${info['total_cost']:.4f}{'  EXHAUSTED' if budget['is_exhausted'] else ''}")
    if threads["threads"]:
        print(f"threads (hottest first, {threads['count']} of {threads['total']}; default "
              f"limit {threads['default_max_tokens']}):")
        for t in threads["threads"]:
            flag = "  EXHAUSTED" if t["is_exhausted"] else ""
            print(f"  {t['thread_id']} {_bar(t['total_tokens'], t['max_tokens'])}{flag}")
    if paused:
        print("paused threads (what holds each; raise it with 'xml-pipeline budget'):")
        for t in paused:
            holds = t["waiting"] or [None]
            for hold in holds:
                print(f"  {t['thread_id']} paused: {_held_text(hold)}" if hold else
                      f"  {t['thread_id']} paused")
    return 0



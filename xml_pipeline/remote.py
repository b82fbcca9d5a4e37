"""CLI commands that talk to a running organism over its HTTP API.

They find it with ``--url``, else ``XML_PIPELINE_URL``, else the ``api`` of ``./organism.yaml``
(with ``XML_PIPELINE_HOST``/``XML_PIPELINE_PORT`` taking precedence), else 127.0.0.1:8765.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

from xml_pipeline.errors import OrganismError
from xml_pipeline.organism import Organism, load_organism

__all__ = ["Style", "inject_command", "local_organism", "remote_command", "tail_command",
           "usage_command"]

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


def _url(args: argparse.Namespace) -> str:
    from xml_pipeline.client import default_url

    if args.url:
        return str(args.url)
    organism = local_organism()
    if organism is not None:
        return default_url(organism.api.host, organism.api.port)
    return default_url()


def inject_command(args: argparse.Namespace) -> int:
    from xml_pipeline.client import Client, ClientError

    try:
        payload = _read_payload(args.payload)
    except OSError as exc:
        print(f"Cannot read the payload: {exc}.", file=sys.stderr)
        return 2
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


def tail_command(args: argparse.Namespace) -> int:
    from xml_pipeline.client import Client, ClientError

    out = sys.stdout
    style = Style(out)
    try:
        with Client(_url(args)) as client:
            # Over the API, tail always follows; --after N replays from position N first.
            for item in client.events(after=args.after,
                                      thread=args.thread, agent=args.agent, types=args.type):
                if args.json:
                    out.write(json.dumps(item) + "\n")
                else:
                    data = {k: v for k, v in item["data"].items() if k != "at"}
                    text = " ".join(f"{k}={str(v)[:80]}" for k, v in data.items()
                                    if v not in (None, "", []) and k not in
                                    ("envelope", "source", "listeners"))
                    out.write(f"{style('#' + str(item['position']), '2')} {item['at']} "
                              f"{style(item['type'], '36')} {text}\n")
                out.flush()
    except ClientError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    return 0


def remote_command(args: argparse.Namespace) -> int:
    """reload / threads / dead-letters against a running organism."""
    from xml_pipeline.client import Client, ClientError

    try:
        with Client(_url(args)) as client:
            if args.command == "reload":
                result = client.post("/organism/reload")
            elif args.command == "budget":
                result = client.post(f"/usage/threads/{args.thread}/budget",
                                     {"max_tokens": args.max_tokens})
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
    elif args.command == "budget":
        print(f"thread {result['thread_id']}: "
              f"{_bar(result['total_tokens'], result['max_tokens'])}")
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
    except ClientError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"usage": usage, "agents": per_agent, "threads": threads}))
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
    return 0



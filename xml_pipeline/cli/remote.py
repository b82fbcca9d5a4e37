"""CLI commands that talk to a running organism over its HTTP API: inject, reload, threads,
dead-letters, budget and usage (``tail --url`` is in ``tail.py``).

They find it with ``--url``, else ``XML_PIPELINE_URL``, else the ``api`` of ``./organism.yaml``
(with ``XML_PIPELINE_HOST``/``XML_PIPELINE_PORT`` taking precedence), else 127.0.0.1:8765.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from xml_pipeline.cli.defaults import local_organism

__all__ = ["UsageError", "api_url", "budget_command", "inject_command", "remote_command",
           "usage_command"]


def _read_payload(text: str) -> str:
    if text == "-":
        return sys.stdin.read()
    if text.startswith("@"):
        return Path(text[1:]).read_text(encoding="utf-8")
    return text


class UsageError(Exception):
    """A command-line value that cannot work; the message says why (exit status 2)."""


def api_url(args: argparse.Namespace) -> str:
    """The organism's base URL, found as this module says; raises ``UsageError`` if the URL
    given cannot be one."""
    from xml_pipeline.cli.client import default_url, organism_url

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
    from xml_pipeline.cli.client import Client, ClientError

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
        with Client(api_url(args)) as client:
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


def remote_command(args: argparse.Namespace) -> int:
    """reload / threads / dead-letters against a running organism."""
    from xml_pipeline.cli.client import Client, ClientError

    try:
        with Client(api_url(args)) as client:
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

    from xml_pipeline.cli.client import Client, ClientError

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
        with Client(api_url(args)) as client:
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
    from xml_pipeline.cli.client import Client, ClientError

    try:
        with Client(api_url(args)) as client:
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

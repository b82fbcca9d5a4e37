"""Commands on an organism file: ``check`` validates and summarises it, ``run`` serves it
(the pump, the HTTP API and the file watcher)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from xml_pipeline.config import Organism, load_organism
from xml_pipeline.errors import OrganismError, XmlPipelineError

__all__ = ["check_command", "run_command"]


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


def check_command(args: argparse.Namespace) -> int:
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


def _inject_hint(organism: Organism, host: str, port: int) -> str:
    """An inject command for the first listener that works as pasted, from any directory."""
    import shlex

    from xml_pipeline.cli.client import default_url

    first = next(iter(organism.listeners.values()))
    payload = " ".join(line.strip() for line in first.schema.example().splitlines())
    payload = payload.replace("> <", "><")
    url = default_url(host, port) if "XML_PIPELINE_URL" not in os.environ else None
    url = url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    return (f"xml-pipeline inject --url {shlex.quote(url)} --to {shlex.quote(first.name)} "
            f"{shlex.quote(payload)}")


def run_command(args: argparse.Namespace) -> int:
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

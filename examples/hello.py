"""Handlers of the demo organism (organism.yaml): greeter -> shouter -> announcer."""

from __future__ import annotations

from typing import Any


async def greet(payload: Any, ctx: Any) -> None:
    """<Greeting><name>Alice</name></Greeting> -> <Shout> to the shouter."""
    name = payload.findtext("name")
    await ctx.send("shouter", {"Shout": {"text": f"Hello, {name}!"}})


async def shout(payload: Any, ctx: Any) -> None:
    """<Shout><text>...</text></Shout> -> <Announcement> with the text upper-cased."""
    text = payload.findtext("text") or ""
    await ctx.send("announcer", {"Announcement": {"text": text.upper(), "by": ctx.name}})


async def announce(payload: Any, ctx: Any) -> None:
    """Log the announcement; returning nothing ends the conversation."""
    ctx.logger.info("%s (thread %s)", payload.findtext("text"), ctx.thread)

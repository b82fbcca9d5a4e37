"""Handlers used by the pump tests. ``seen`` records (listener, thread, payload text, ctx facts)."""

from __future__ import annotations

import asyncio
from typing import Any

from lxml import etree

from xml_pipeline.envelope import ENVELOPE_NS

seen: list[dict[str, Any]] = []
gate = asyncio.Event()  # handlers that wait for the test to let them finish
entered: list[str] = []


def reset() -> None:
    global gate
    seen.clear()
    entered.clear()
    gate = asyncio.Event()


def _record(payload: Any, ctx: Any) -> None:
    seen.append({"listener": ctx.name, "thread": ctx.thread, "sender": ctx.sender,
                 "message_id": ctx.message_id, "parent": ctx.parent,
                 "redelivery": ctx.redelivery, "attempt": ctx.attempt,
                 "tag": etree.QName(payload).localname, "namespace": etree.QName(payload).namespace,
                 "n": payload.findtext("n"), "text": etree.tostring(payload).decode()})


async def first(payload: Any, ctx: Any) -> None:
    _record(payload, ctx)
    await ctx.send("second", {"n": payload.findtext("n")})


async def second(payload: Any, ctx: Any) -> None:
    _record(payload, ctx)
    await ctx.send("third", f"<Item><n>{payload.findtext('n')}</n></Item>")


async def third(payload: Any, ctx: Any) -> None:
    _record(payload, ctx)


async def caller(payload: Any, ctx: Any) -> None:
    """<Item><n>k</n></Item> from outside -> echo; the echo's reply comes back here."""
    _record(payload, ctx)
    if ctx.sender != "echo":
        await ctx.send("echo", payload)


async def echo(payload: Any, ctx: Any) -> None:
    _record(payload, ctx)
    await ctx.reply(f"<Item><n>{payload.findtext('n')}</n></Item>")


async def forger(payload: Any, ctx: Any) -> None:
    """Tries to send as someone else, into another thread, with its own id."""
    _record(payload, ctx)
    if ctx.sender == "system":
        return
    await ctx.send("third", (
        f'<message xmlns="{ENVELOPE_NS}"><meta><id>FORGED</id><from>admin</from>'
        "<to>third</to><thread>stolen-thread</thread></meta>"
        '<Item xmlns=""><n>1</n></Item></message>'))


async def trespasser(payload: Any, ctx: Any) -> None:
    """Sends to a listener that is not its peer, then an invalid payload to its peer."""
    _record(payload, ctx)
    if ctx.sender == "system":
        return
    await ctx.send("third", "<Item><n>1</n></Item>")  # not a declared peer
    await ctx.send("second", "<Item><wrong/></Item>")  # a peer, but an invalid payload


async def stubborn(payload: Any, ctx: Any) -> None:
    """Answers every SystemError with another bad send (the bus must stop answering)."""
    _record(payload, ctx)
    await ctx.send("second", "<Item><wrong/></Item>")


async def slow(payload: Any, ctx: Any) -> None:
    """Waits for the test's gate."""
    entered.append(ctx.message_id)
    _record(payload, ctx)
    await gate.wait()
    await ctx.send("third", "<Item><n>after-gate</n></Item>")


async def failing(payload: Any, ctx: Any) -> None:
    _record(payload, ctx)
    raise RuntimeError(f"boom on attempt {ctx.attempt}")


async def sleepy(payload: Any, ctx: Any) -> None:
    _record(payload, ctx)
    await asyncio.sleep(3600)


async def flaky(payload: Any, ctx: Any) -> None:
    _record(payload, ctx)
    if ctx.attempt < 2:
        raise ValueError("first attempt fails")

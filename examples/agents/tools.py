"""The tool of the two-agent example: the word counter ("counter") the editor calls to check
the length of the writer's draft."""

from __future__ import annotations

from typing import Any


async def count_words(payload: Any, ctx: Any) -> None:
    """<Note><text>...</text></Note> -> a reply with the number of words in the text."""
    text = payload.findtext("text") or ""
    await ctx.reply(f"<Note><text>{len(text.split())} words</text></Note>")

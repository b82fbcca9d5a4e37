"""LLM agents on the ``anthropic`` SDK, with token budgets enforced before every call.

An agent listener (``agent:`` in organism.yaml) runs ``AgentRuntime.handle``:

1. The prompt is the agent's system prompt, a description of each peer it may address (its
   description and payload schema), the reply protocol, and the thread's history as this agent
   saw it (the messages it received and its own earlier answers, from the log).
2. Before a call, its worst case (a prompt estimate plus ``max_tokens``) is checked against the
   thread's budget, the agent's budget in the thread (its ``budget.thread_tokens``), the
   agent's and the organism's (``state.budgets.blocking``); a call that would exceed one is
   not made: ``BudgetExhausted`` is recorded and the thread waits until a raise frees it. Otherwise
   ``TokensReserved`` is recorded, the call made, and ``TokensUsed`` (settling the reservation)
   and ``ModelResponded`` (the full answer) recorded together.
3. The answer's ``<send to="...">payload</send>`` blocks are extracted (prose around them is
   ignored; the payloads are sent exactly as written), checked, and sent. An answer that does
   not fit goes back to the agent as a ``<SystemError>`` turn, at most ``MAX_CORRECTIONS`` times;
   every attempt counts in usage.

**Never pay twice:** each call is keyed ``<message id>#<step>``; on a redelivery or a replay,
a key whose answer is in the log reuses it and the model is not called.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

from lxml import etree

from xml_pipeline.config import Listener, Organism
from xml_pipeline.errors import AgentError, BudgetExhaustedError, XmlError
from xml_pipeline.events import (
    BudgetExhausted,
    BudgetWarned,
    Event,
    MessageAccepted,
    ModelResponded,
    TokensReserved,
    TokensUsed,
)
from xml_pipeline.ids import IdFactory
from xml_pipeline.runtime.handlers import Context, system_error
from xml_pipeline.runtime.ledger import Ledger
from xml_pipeline.state.budgets import blocking, gauges
from xml_pipeline.types import Clock
from xml_pipeline.xmlsafe import parse_xml

__all__ = ["AgentRuntime", "PRICES", "estimate_tokens", "extract_sends"]

MAX_CORRECTIONS = 2
WARNING_LEVELS = (75, 90, 95)
KEY_ENV = "ANTHROPIC_API_KEY"

#: USD per million tokens: (input, output). Cache reads cost 10% of input, writes 125%.
#: A model missing here costs 0 unless its agent sets ``prices`` in organism.yaml.
PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4-6": (5.0, 25.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
}

_OPEN = re.compile(r"<send\s+to\s*=\s*[\"']([^\"'<>]{0,200})[\"']\s*>")
_CLOSE = re.compile(r"</send\s*>")


def estimate_tokens(text: str) -> int:
    """A conservative estimate of the tokens in ``text`` (about 3.5 characters a token)."""
    return int(len(text) / 3.5) + 1


def extract_sends(text: str) -> list[tuple[str, str]]:
    """Every ``(to, payload text)`` of ``<send to="...">...</send>`` in an answer, in order.
    One pass over the text (a hostile answer cannot make it quadratic)."""
    found = []
    position = 0
    while (start := text.find("<send", position)) >= 0:
        opening = _OPEN.match(text, start)
        if opening is None:
            position = start + 5
            continue
        closing = _CLOSE.search(text, opening.end())
        if closing is None:
            break
        found.append((opening.group(1).strip(), text[opening.end():closing.start()].strip()))
        position = closing.end()
    return found


def _cost(listener: Listener, usage: Any) -> float:
    agent = listener.agent
    assert agent is not None
    base_in, base_out = PRICES.get(agent.model, (0.0, 0.0))
    price_in = agent.price_input if agent.price_input is not None else base_in
    price_out = agent.price_output if agent.price_output is not None else base_out
    cache_read = getattr(usage, "cache_read_input_tokens", 0) or 0
    cache_write = getattr(usage, "cache_creation_input_tokens", 0) or 0
    return (usage.input_tokens * price_in + usage.output_tokens * price_out
            + cache_read * price_in * 0.1 + cache_write * price_in * 1.25) / 1_000_000


class AgentRuntime:
    """Runs agent listeners for one pump. ``client_factory`` makes the SDK client (tests point
    it at a local stub of the Messages API through ``ANTHROPIC_BASE_URL``)."""

    def __init__(self, *, ledger: Ledger, clock: Clock, organism: Callable[[], Organism],
                 client_factory: Callable[[], Any] | None = None) -> None:
        self._ledger = ledger
        self._clock = clock
        self._organism = organism
        self._ids = IdFactory(clock=clock)
        self._client: Any = None
        self._client_factory = client_factory

    # ------------------------------------------------------------ the prompt

    def system_prompt(self, listener: Listener, sender: str) -> str:
        agent = listener.agent
        assert agent is not None
        organism = self._organism()
        lines = [agent.system.strip(), "", "## How to answer",
                 "Answer only with messages of this form, one per recipient; text outside "
                 "them is ignored:",
                 '<send to="RECIPIENT">', "  <Payload>...exactly one XML element...</Payload>",
                 "</send>",
                 f'To answer whoever sent you the current message, use to="{sender}".',
                 "If nothing needs to be sent, answer <done/>.",
                 "A message that does not fit its recipient's schema comes back to you as a "
                 "<SystemError>; then correct it.", "", "## Who you can send to"]
        for name in listener.peers:
            peer = organism.listeners.get(name)
            if peer is None:
                continue
            lines += ["", f"### {name}", peer.description.strip(),
                      f"It accepts <{peer.schema.root}>, defined by this XML Schema:",
                      peer.schema.text.strip()]
        if not listener.peers:
            lines.append("(nobody: you can only answer the sender)")
        return "\n".join(lines)

    async def history(self, listener: Listener, thread_id: str, message_id: str
                      ) -> list[dict[str, str]]:
        """The thread as this agent saw it: each message it received (a user turn) and its
        final answer to it (an assistant turn), ending with the current message."""
        state = self._ledger.state
        thread = state.threads.threads.get(thread_id)
        if thread is None or not thread.positions:
            return []
        turns: list[dict[str, str]] = []
        received: list[MessageAccepted] = []
        async for record in self._ledger.log.read(after=thread.positions[0] - 1):
            event = record.event
            if isinstance(event, MessageAccepted) and event.thread_id == thread_id \
                    and event.to == listener.name:
                received.append(event)
                if event.message_id == message_id:
                    break
            if record.position >= thread.positions[-1]:
                break
        for event in received:
            turns.append({"role": "user", "content": _user_turn(event)})
            if event.message_id == message_id:
                break
            answer = await self._final_answer(event.message_id)
            if answer is not None:
                turns.append({"role": "assistant", "content": answer})
        return _alternate(turns)

    async def _recorded(self, key: str) -> ModelResponded | None:
        position = self._ledger.state.budgets.responses.get(key)
        if position is None:
            return None
        async for record in self._ledger.log.read(after=position - 1):
            return record.event if isinstance(record.event, ModelResponded) else None
        return None

    async def _final_answer(self, message_id: str) -> str | None:
        answer = None
        for step in range(MAX_CORRECTIONS + 1):
            recorded = await self._recorded(f"{message_id}#{step}")
            if recorded is None:
                break
            answer = recorded.text
        return answer

    # ------------------------------------------------------------ budgets

    async def _check(self, listener: Listener, thread_id: str, requested: int) -> None:
        budgets = self._ledger.state.budgets
        blocker = blocking(budgets, thread_id, listener.name, requested,
                           organism=self._organism().name)
        if blocker is None:
            return
        gauge = blocker.gauge
        assert gauge.limit is not None  # only a gauge with a limit refuses
        await self._ledger.commit([BudgetExhausted(
            at=self._clock(), scope=blocker.scope, key=blocker.key, thread_id=thread_id,
            agent=listener.name, limit=gauge.limit, used=gauge.used + gauge.reserved,
            requested=requested)])
        raise BudgetExhaustedError(
            f"The {blocker.scope} budget of {blocker.key} would be exceeded: "
            f"{gauge.used + gauge.reserved} of {gauge.limit} tokens used, this call "
            f"needs up to {requested}. Raise it to continue.",
            scope=blocker.scope, key=blocker.key)

    def _warnings(self, listener: Listener, thread_id: str) -> list[Event]:
        events: list[Event] = []
        warned = self._ledger.state.budgets.warnings
        for budget, gauge in gauges(self._ledger.state.budgets, thread_id, listener.name,
                                    organism=self._organism().name):
            if not gauge.limit:
                continue
            percent = 100 * gauge.used / gauge.limit
            level = max((lv for lv in WARNING_LEVELS if percent >= lv), default=0)
            if level > warned.get(str(budget), 0):
                events.append(BudgetWarned(at=self._clock(), scope=budget.scope, key=budget.key,
                                           percent=level, used=gauge.used, limit=gauge.limit))
        return events

    # ------------------------------------------------------------ the call

    def _sdk(self) -> Any:
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory()
            else:
                if not os.environ.get(KEY_ENV):
                    raise AgentError(f"{KEY_ENV} is not set; set it in the environment of "
                                     "'xml-pipeline run' to run LLM agents.")
                try:
                    import anthropic
                except ImportError as exc:
                    raise AgentError("LLM agents need the anthropic SDK: pip install "
                                     "'xml-pipeline[agents]'.") from exc
                self._client = anthropic.AsyncAnthropic(max_retries=4)
        return self._client

    async def _call(self, listener: Listener, ctx: Context, step: int, system: str,
                    messages: list[dict[str, str]]) -> str:
        key = f"{ctx.message_id}#{step}"
        recorded = await self._recorded(key)
        if recorded is not None:
            return recorded.text  # never pay twice
        agent = listener.agent
        assert agent is not None
        requested = estimate_tokens(system + "".join(m["content"] for m in messages)) \
            + agent.max_tokens
        await self._check(listener, ctx.thread, requested)
        client = self._sdk()
        reservation = self._ids.new()
        await self._ledger.commit([TokensReserved(
            at=self._clock(), reservation_id=reservation, thread_id=ctx.thread,
            agent=listener.name, model=agent.model, tokens=requested)])
        started = time.perf_counter()
        options: dict[str, Any] = {"model": agent.model, "max_tokens": agent.max_tokens,
                                   "system": system, "messages": messages}
        if agent.temperature is not None:
            options["temperature"] = agent.temperature
        try:
            response = await client.messages.create(**options)
        except BaseException as exc:
            self._ledger.commit_soon([TokensUsed(
                at=self._clock(), thread_id=ctx.thread, agent=listener.name,
                model=agent.model, input_tokens=0, output_tokens=0,
                latency_ms=(time.perf_counter() - started) * 1000, reservation_id=reservation,
                message_id=ctx.message_id)])
            message = getattr(exc, "message", None) or str(exc)
            body = getattr(exc, "body", None)
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                message = str(body["error"].get("message") or message)
            status = getattr(exc, "status_code", None)
            if isinstance(exc, Exception) and type(exc).__module__.startswith("anthropic"):
                raise AgentError(f"The Anthropic API refused the call"
                                 f"{f' ({status})' if status else ''}: {message}") from exc
            raise
        text = "".join(getattr(block, "text", "") for block in response.content)
        usage = response.usage
        events: list[Event] = [
            TokensUsed(at=self._clock(), thread_id=ctx.thread, agent=listener.name,
                       model=agent.model, input_tokens=usage.input_tokens,
                       output_tokens=usage.output_tokens,
                       cache_read_tokens=getattr(usage, "cache_read_input_tokens", 0) or 0,
                       cache_creation_tokens=getattr(usage, "cache_creation_input_tokens", 0)
                       or 0, cost=_cost(listener, usage),
                       latency_ms=(time.perf_counter() - started) * 1000,
                       reservation_id=reservation, message_id=ctx.message_id),
            ModelResponded(at=self._clock(), key=key, message_id=ctx.message_id,
                           thread_id=ctx.thread, agent=listener.name, model=agent.model,
                           text=text, stop_reason=getattr(response, "stop_reason", None)),
        ]
        await self._ledger.commit(events)
        warnings = self._warnings(listener, ctx.thread)
        if warnings:
            await self._ledger.commit(warnings)
        return text

    # ------------------------------------------------------------ a delivery

    async def handle(self, listener: Listener, payload: etree._Element, ctx: Context) -> None:
        system = self.system_prompt(listener, ctx.sender)
        messages = await self.history(listener, ctx.thread, ctx.message_id)
        if not messages or messages[-1]["role"] != "user":
            messages.append({"role": "user", "content": etree.tostring(payload).decode()})
        problem = ""
        for step in range(MAX_CORRECTIONS + 1):
            text = await self._call(listener, ctx, step, system, messages)
            sends, problem = self._check_answer(listener, ctx, text)
            if not problem:
                for to, element in sends:
                    if to == ctx.sender:
                        await ctx.reply(element)
                    else:
                        await ctx.send(to, element)
                return
            correction = etree.tostring(system_error(code="invalid_answer", message=problem),
                                        encoding="unicode")
            messages = _alternate([*messages, {"role": "assistant", "content": text},
                                   {"role": "user", "content": correction}])
        raise AgentError(f"The agent's answer was still invalid after {MAX_CORRECTIONS} "
                         f"corrections: {problem}")

    def _check_answer(self, listener: Listener, ctx: Context, text: str
                      ) -> tuple[list[tuple[str, etree._Element]], str]:
        found = extract_sends(text)
        if not found and re.search(r"<done\s*/>", text):
            return [], ""
        if not found:
            return [], ('Your answer has no <send to="..."> element. Answer with one '
                        '<send to="RECIPIENT">payload</send> per message, or <done/>.')
        organism = self._organism()
        sends = []
        for to, body in found:
            if to != ctx.sender and to not in listener.peers:
                allowed = ", ".join([ctx.sender, *listener.peers])
                return [], f"You may not send to {to!r}; you may send to: {allowed}."
            try:
                element = parse_xml(body, limits=organism.limits)
            except XmlError as exc:
                return [], f"The message to {to!r} is not one well-formed XML element: " \
                           f"{exc.message}"
            target = organism.listeners.get(to)
            if target is not None:
                try:
                    target.schema.validate(element)
                except XmlError as exc:
                    return [], f"The message to {to!r} does not fit its schema: {exc.message}"
            sends.append((to, element))
        return sends, ""


def _user_turn(event: MessageAccepted) -> str:
    match = re.search(r"</meta>(.*)</message>\s*\Z", event.envelope, re.S)
    body = match.group(1) if match else event.envelope
    return f'<received from="{event.sender}">{body}</received>'


def _alternate(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Merge consecutive turns of one role (the Messages API wants them alternating)."""
    merged: list[dict[str, str]] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1] = {"role": turn["role"],
                          "content": merged[-1]["content"] + "\n\n" + turn["content"]}
        else:
            merged.append(dict(turn))
    return merged

"""A realistic event mix shared by the benchmarks (not a benchmark itself).

A conversation is a thread of ``HOPS`` messages, api -> greeter -> shouter -> responder; each
message is ``MessageAccepted`` (with a real ~600-byte envelope made by ``build_envelope``),
``MessageDelivered`` and ``HandlerSucceeded``, and the thread ends with ``ThreadCompleted``:
10 events per conversation. Conversations run ``WINDOW`` at a time, interleaved message by
message, as a busy pump would write them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from xml_pipeline.envelope import build_envelope, format_timestamp
from xml_pipeline.events import (
    Event,
    HandlerSucceeded,
    MessageAccepted,
    MessageDelivered,
    OrganismLoaded,
    ThreadCompleted,
)
from xml_pipeline.ids import IdFactory

HOPS = 3
WINDOW = 16
CHAIN = ("api", "greeter", "shouter", "responder")
EVENTS_PER_CONVERSATION = 3 * HOPS + 1
ENVELOPE_BYTES = 600

_PAYLOAD_HEAD = b'<Greeting xmlns="urn:example:greeting"><name>Ada Lovelace</name><text>'
_PAYLOAD_TAIL = b"</text></Greeting>"


def _payload(filler: int) -> bytes:
    text = (b"Hello from the benchmark, a plain sentence of ordinary length. " * 20)[:filler]
    return _PAYLOAD_HEAD + text + _PAYLOAD_TAIL


def _sized_payload() -> bytes:
    """A payload that makes a root-less envelope (no <parent>) exactly ENVELOPE_BYTES long."""
    ids = IdFactory()
    probe = build_envelope(id=ids.new(), sender="greeter", to="shouter", thread=ids.new(),
                           payload=_payload(0), sent=format_timestamp(time.time()))
    return _payload(max(0, ENVELOPE_BYTES - len(probe)))


PAYLOAD = _sized_payload()


def organism_loaded(at: float) -> OrganismLoaded:
    return OrganismLoaded(at=at, name="bench", digest="0" * 64, source="name: bench\n",
                          budgets={"thread_tokens": None},
                          listeners={name: {"payload": "Greeting"} for name in CHAIN[1:]})


def _conversation(ids: IdFactory, clock: list[float]) -> Iterator[list[Event]]:
    """The conversation's steps: one list of events per message, then the completion."""
    thread = ids.new()
    parent = None
    for hop in range(HOPS):
        sender, to = CHAIN[hop], CHAIN[hop + 1]
        message = ids.new()
        at = clock[0]
        clock[0] += 0.0002
        envelope = build_envelope(id=message, sender=sender, to=to, thread=thread,
                                  payload=PAYLOAD, sent=format_timestamp(at), parent=parent)
        yield [
            MessageAccepted(at=at, message_id=message, thread_id=thread, parent_id=parent,
                            sender=sender, to=to, payload_type="Greeting",
                            envelope=envelope.decode("utf-8")),
            MessageDelivered(at=at + 0.00005, message_id=message, listener=to, attempt=1),
            HandlerSucceeded(at=at + 0.0001, message_id=message, listener=to, duration_ms=0.05),
        ]
        parent = message
    yield [ThreadCompleted(at=clock[0], thread_id=thread)]


def events(count: int, *, start: float | None = None, loaded: bool = True) -> Iterator[Event]:
    """``count`` events of the realistic mix (an ``OrganismLoaded`` first if ``loaded``)."""
    ids = IdFactory()
    clock = [start if start is not None else time.time()]
    produced = 0
    if loaded and count:
        yield organism_loaded(clock[0])
        produced = 1
    while produced < count:
        window = [_conversation(ids, clock) for _ in range(WINDOW)]
        while window and produced < count:
            alive = []
            for steps in window:
                step = next(steps, None)
                if step is None:
                    continue
                alive.append(steps)
                for event in step:
                    if produced == count:
                        return
                    yield event
                    produced += 1
            window = alive

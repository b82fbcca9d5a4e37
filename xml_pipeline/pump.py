"""The pump: accepts envelopes, appends them to the log, and delivers them to mailboxes.

Every message, injected or sent by a handler, goes through ``_accept``: route (listener exists,
peer declared, thread open), validate the payload against the target's schema, append
``MessageAccepted`` (or ``MessageRejected`` with the reason), then put it in the target's
mailbox. Each event is durable before it takes effect and is folded into ``state`` with the
same ``State.apply`` a replay uses.

``open_pump`` replays the log, redelivers every accepted message without a final outcome
(flagged as a redelivery), runs the workers in one task group, and on exit stops gracefully:
accept nothing new, let in-flight handlers finish within ``stop_timeout``, record
``OrganismStopped``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from lxml import etree

import xml_pipeline
from xml_pipeline.delivery import Deliverer
from xml_pipeline.envelope import (
    ENVELOPE_NS,
    build_envelope,
    format_timestamp,
    is_valid_id,
    parse_envelope,
    serialize_payload,
)
from xml_pipeline.errors import (
    BusyError,
    EnvelopeError,
    LogError,
    ThreadClosedError,
    UndeclaredPeerError,
    UnknownListenerError,
    XmlPipelineError,
)
from xml_pipeline.events import (
    AgentPaused,
    AgentResumed,
    Event,
    MessageAccepted,
    MessageDeadLettered,
    MessageDropped,
    MessageRejected,
    OrganismLoaded,
    OrganismStarted,
    OrganismStopped,
    ThreadKilled,
)
from xml_pipeline.handlers import Payload, coerce_payload, system_error
from xml_pipeline.ids import IdFactory
from xml_pipeline.ledger import Ledger
from xml_pipeline.log import EventLog
from xml_pipeline.log.file import FileLog
from xml_pipeline.mailbox import Delivery, Mailbox
from xml_pipeline.organism import RESERVED_SENDERS, Listener, Organism
from xml_pipeline.state import State, latest_snapshot, replay, save_snapshot
from xml_pipeline.state.threads import FINAL
from xml_pipeline.types import Clock, system_clock

__all__ = ["Accepted", "Pump", "open_pump"]

RAW_CAP = 4096  # bytes of rejected input kept in MessageRejected
MAX_SYSTEM_ERRORS = 3  # SystemErrors in a row before the bus stops answering bad sends
_log = logging.getLogger("xml_pipeline.pump")


@dataclass(frozen=True, slots=True)
class Accepted:
    message_id: str
    thread_id: str
    duplicate: bool = False  # True if an idempotency key matched an earlier message


def _raw_text(data: Any) -> str:
    if isinstance(data, etree._Element):
        data = etree.tostring(data)
    if isinstance(data, bytes):
        return data[:RAW_CAP].decode("utf-8", "backslashreplace")
    return str(data)[:RAW_CAP]


def _did_you_mean(word: str, names: Any) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(names), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class Pump:
    """Create with ``open_pump``. All methods run on the pump's event loop."""

    def __init__(self, *, organism: Organism, log: EventLog, clock: Clock,
                 mailbox_capacity: int, stop_timeout: float) -> None:
        self.organism = organism
        self.log = log
        self._clock = clock
        self._ids = IdFactory(clock=clock)
        self._capacity = mailbox_capacity
        self._stop_timeout = stop_timeout
        self._mailboxes: dict[str, Mailbox] = {}
        self._accepting = 0
        self._pending_keys: dict[str, Accepted] = {}
        self._ledger = Ledger(log=log, state=State(), clock=clock)
        self._commit_soon = self._ledger.commit_soon
        self._commit = self._ledger.commit
        self._outcome = self._ledger.outcome
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._deliverer = Deliverer(ledger=self._ledger, clock=clock, mailboxes=self._mailboxes,
                                    listeners=lambda: self.organism.listeners, send=self._send)

    # ------------------------------------------------------------ state, through the ledger

    @property
    def state(self) -> State:
        return self._ledger.state

    @property
    def _signal(self) -> asyncio.Event:
        return self._ledger.signal

    def _notify(self) -> None:
        self._ledger.notify()

    # ------------------------------------------------------------ start and recovery

    def _snapshots(self) -> Path | None:
        return self.log.directory if isinstance(self.log, FileLog) else None

    async def _start(self) -> None:
        folder = self._snapshots()
        snapshot = None if folder is None else await asyncio.to_thread(latest_snapshot, folder)
        self._ledger.state = await replay(self.log, state=snapshot)
        # After a crash (no OrganismStopped last), any pending message may have been seen.
        self._clean_start = self.state.agents.status in ("new", "stopped")
        now = self._clock()
        events: list[Event] = [OrganismStarted(at=now, name=self.organism.name,
                                               digest=self.organism.digest, pid=os.getpid(),
                                               host=socket.gethostname(),
                                               version=xml_pipeline.__version__)]
        if self.state.agents.digest != self.organism.digest:
            events.append(loaded_event(self.organism, at=now))
        await self._commit(events)
        for name in self.organism.listeners:
            mailbox = Mailbox(capacity=self._capacity)
            info = self.state.agents.agents.get(name)
            if info is not None and info.status == "paused":
                mailbox.pause()
            self._mailboxes[name] = mailbox
        await self._recover()
        self._ledger.count_open()

    async def _recover(self) -> None:
        messages = self.state.threads.messages
        pending = {m.message_id: m for m in messages.values() if m.status not in FINAL}
        if not pending:
            return
        start = min(m.position for m in pending.values()) - 1
        found: dict[str, MessageAccepted] = {}
        async for record in self.log.read(after=start):
            event = record.event
            if isinstance(event, MessageAccepted) and event.message_id in pending:
                found[event.message_id] = event
            if len(found) == len(pending):
                break
        outcomes: list[Event] = []
        now = self._clock()
        for info in sorted(pending.values(), key=lambda m: m.position):
            accepted = found.get(info.message_id)
            thread = self.state.threads.threads.get(info.thread_id)
            if accepted is None:
                continue
            if thread is not None and thread.status == "killed":
                outcomes.append(MessageDropped(at=now, message_id=info.message_id,
                                               thread_id=info.thread_id, reason="thread killed"))
                continue
            mailbox = self._mailboxes.get(info.to)
            if mailbox is None:
                outcomes.append(MessageDeadLettered(
                    at=now, message_id=info.message_id, listener=info.to,
                    reason=f"Listener {info.to!r} no longer exists in the organism."))
                continue
            envelope = parse_envelope(accepted.envelope, limits=self.organism.limits)
            mailbox.put(Delivery(message_id=info.message_id, thread_id=info.thread_id,
                                 sender=info.sender, parent_id=info.parent_id,
                                 payload=envelope.payload,
                                 envelope=accepted.envelope.encode("utf-8"),
                                 redelivery=info.attempts > 0 or not self._clean_start,
                                 attempts=info.attempts),
                        reserved=False)
        if outcomes:
            await self._commit(outcomes)

    # ------------------------------------------------------------ accepting messages

    async def inject(self, data: Payload, *, to: str | None = None, thread_id: str | None = None,
                     sender: str = "api", idempotency_key: str | None = None,
                     wait: bool = False) -> Accepted:
        """Accept a message from outside: a full envelope (``to`` None) or a payload for ``to``.

        Returns once the message is durable. Raises an ``XmlError``/``RoutingError`` subclass
        (recorded as ``MessageRejected``) or, when the target's mailbox is full, waits for room
        (``wait=True``) or raises ``MailboxFullError`` (not recorded: try again later).
        """
        if self._stopping:
            raise BusyError("The organism is stopping; it accepts no new messages.")
        try:
            if to is None:
                envelope = parse_envelope(data if isinstance(data, str | bytes) else
                                          etree.tostring(data), limits=self.organism.limits)
                to, payload = envelope.to, envelope.payload
                thread_id = thread_id or envelope.thread
            else:
                listener = self._listener(to)
                payload = coerce_payload(data, listener.schema, limits=self.organism.limits)
                payload = _unwrap(payload)
            return await self._accept(payload=payload, to=to, sender=sender,
                                      thread_id=thread_id, parent_id=None,
                                      idempotency_key=idempotency_key, wait=wait)
        except (BusyError, LogError):
            raise
        except XmlPipelineError as exc:
            await self._reject(exc, raw=data, sender=sender, to=to, thread_id=thread_id,
                               parent_id=None)
            raise

    def _listener(self, name: str) -> Listener:
        listener = self.organism.listeners.get(name)
        if listener is None:
            raise UnknownListenerError(
                f"There is no listener {name!r} in organism {self.organism.name!r}."
                f"{_did_you_mean(name, self.organism.listeners)} Listeners: "
                f"{', '.join(self.organism.listeners)}."
            )
        return listener

    async def _accept(self, *, payload: etree._Element, to: str, sender: str,
                      thread_id: str | None, parent_id: str | None,
                      idempotency_key: str | None, wait: bool, validate: bool = True,
                      system_depth: int = 0, durable: bool = True) -> Accepted:
        """Route, validate and append one message. With ``durable`` it returns once the message
        is in the log; otherwise at once (it reaches the mailbox when durable either way)."""
        threads = self.state.threads
        if idempotency_key is not None:
            if idempotency_key in threads.idempotency:
                message_id, thread_of = threads.idempotency[idempotency_key]
                return Accepted(message_id, thread_of, duplicate=True)
            if idempotency_key in self._pending_keys:
                pending = self._pending_keys[idempotency_key]
                return Accepted(pending.message_id, pending.thread_id, duplicate=True)
        outbound = to in RESERVED_SENDERS
        if not outbound:
            listener = self._listener(to)
            if validate:
                listener.schema.validate(payload)
        if thread_id is not None:
            if not is_valid_id(thread_id):
                raise EnvelopeError(
                    f"The thread id {thread_id[:80]!r} is not valid: use 1 to 128 letters, "
                    "digits, '_', '.', ':' or '-', or leave it out to start a new thread.")
            known = threads.threads.get(thread_id)
            if known is not None and known.status == "killed":
                raise ThreadClosedError(
                    f"Thread {thread_id} was killed; it accepts no new messages. Start a new "
                    "thread instead (leave thread_id out).")
        mailbox = None if outbound else self._mailboxes[to]
        self._accepting += 1
        try:
            if mailbox is not None:
                if wait:
                    await mailbox.reserve()
                else:
                    mailbox.reserve_nowait()
            try:
                message_id = self._ids.new()
                thread = thread_id or self._ids.new()
                now = self._clock()
                envelope = build_envelope(id=message_id, sender=sender, to=to, thread=thread,
                                          parent=parent_id, sent=format_timestamp(now),
                                          payload=serialize_payload(payload))
                event = MessageAccepted(at=now, message_id=message_id, thread_id=thread,
                                        parent_id=parent_id, sender=sender, to=to,
                                        payload_type=etree.QName(payload).localname,
                                        envelope=envelope.decode("utf-8"),
                                        idempotency_key=idempotency_key)
                future = self._commit_soon([event])
            except BaseException:
                if mailbox is not None:
                    mailbox.release()
                raise
            accepted = Accepted(message_id, thread)
            if mailbox is not None:
                self._ledger.opened(thread)
            if idempotency_key is not None:
                self._pending_keys[idempotency_key] = accepted
            delivery = None if mailbox is None else Delivery(
                message_id=message_id, thread_id=thread, sender=sender, parent_id=parent_id,
                payload=payload, envelope=envelope, system_depth=system_depth)
            future.add_done_callback(partial(self._accepted, mailbox, delivery,
                                             idempotency_key))
        finally:
            self._accepting -= 1
        if not durable:
            return accepted
        await asyncio.shield(future)
        return accepted

    def _accepted(self, mailbox: Mailbox | None, delivery: Delivery | None,
                  idempotency_key: str | None, future: asyncio.Future[list[int]]) -> None:
        """Once a MessageAccepted is durable (and folded), deliver it; if it failed, free its
        mailbox slot (the sender was told through the append's error)."""
        if idempotency_key is not None:
            self._pending_keys.pop(idempotency_key, None)
        if mailbox is None or delivery is None:
            return
        if future.cancelled() or future.exception() is not None:
            mailbox.release()
        else:
            mailbox.put(delivery)
        self._notify()

    async def _reject(self, exc: XmlPipelineError, *, raw: Any, sender: str | None,
                      to: str | None, thread_id: str | None, parent_id: str | None,
                      durable: bool = True) -> None:
        future = self._commit_soon([MessageRejected(at=self._clock(), reason=exc.code,
                                            error=exc.message, raw=_raw_text(raw),
                                            sender=sender, to=to, thread_id=thread_id,
                                            parent_id=parent_id)])
        if durable:
            await asyncio.shield(future)

    async def _send(self, listener: Listener, delivery: Delivery, to: str, data: Payload,
                    is_reply: bool) -> str | None:
        """A handler's send or reply. Returns the new message id, or None if refused."""
        try:
            if (delivery.message_id in self._deliverer.killed
                    or self._deliverer.thread_killed(delivery.thread_id)):
                raise ThreadClosedError(f"Thread {delivery.thread_id} was killed; the message "
                                        "was not sent.")
            outbound = is_reply and to in RESERVED_SENDERS
            if not outbound:
                target = self._listener(to)
                if not is_reply and to not in listener.peers:
                    peers = ", ".join(listener.peers) or "none"
                    raise UndeclaredPeerError(
                        f"Listener {listener.name!r} may not send to {to!r}: its peers in "
                        f"organism.yaml (line {listener.line}) are: {peers}. Send to a "
                        f"declared peer, or add {to!r} to its peers.")
                payload = coerce_payload(data, target.schema, limits=self.organism.limits)
            elif isinstance(data, Mapping):
                raise XmlPipelineError("A reply to an API client must be XML, not a dict.")
            else:
                payload = coerce_payload(data, listener.schema, limits=self.organism.limits)
            earlier = self._earlier_send(listener, delivery, to)
            if earlier is not None:
                return earlier
            accepted = await self._accept(payload=_unwrap(payload), to=to,
                                          sender=listener.name, thread_id=delivery.thread_id,
                                          parent_id=delivery.message_id, idempotency_key=None,
                                          wait=True, durable=False)
            return accepted.message_id
        except (BusyError, LogError):
            raise
        except XmlPipelineError as exc:
            await self._reject(exc, raw=data if not isinstance(data, Mapping) else repr(data),
                               sender=listener.name, to=to, thread_id=delivery.thread_id,
                               parent_id=delivery.message_id, durable=False)
            if isinstance(exc, ThreadClosedError) or delivery.system_depth >= MAX_SYSTEM_ERRORS:
                return None
            await self._accept(payload=system_error(code=exc.code, message=exc.message,
                                                    rejected_to=to),
                               to=listener.name, sender="system",
                               thread_id=delivery.thread_id, parent_id=delivery.message_id,
                               idempotency_key=None, wait=True, validate=False,
                               system_depth=delivery.system_depth + 1, durable=False)
            return None

    def _earlier_send(self, listener: Listener, delivery: Delivery, to: str) -> str | None:
        """On a redelivery or retry, the k-th send of this call returns the message the k-th
        send of an earlier call already put in the log (same target), instead of sending it
        twice: downstream listeners see each message once even though the handler ran again."""
        index = delivery.sends
        delivery.sends += 1
        if not delivery.redelivery and delivery.attempts <= 1:
            return None
        if delivery.prior_sends is None:
            threads = self.state.threads
            thread = threads.threads.get(delivery.thread_id)
            ids = thread.messages if thread is not None else []
            delivery.prior_sends = [
                m for m in ids
                if (info := threads.messages.get(m)) is not None
                and info.parent_id == delivery.message_id and info.sender == listener.name
            ]
        if index < len(delivery.prior_sends):
            earlier = self.state.threads.messages.get(delivery.prior_sends[index])
            if earlier is not None and earlier.to == to:
                return earlier.message_id
        return None

    # ------------------------------------------------------------ control

    async def pause(self, agent: str, *, by: str, reason: str = "") -> str:
        """Pause ``agent``: it receives nothing until resumed; its messages wait, in order.
        A message in flight finishes. Returns the agent's state."""
        self._listener(agent)
        info = self.state.agents.agents.get(agent)
        if info is None or info.status != "paused":
            await self._commit([AgentPaused(at=self._clock(), agent=agent, by=by, reason=reason)])
        self._mailboxes[agent].pause()
        return "paused"

    async def resume(self, agent: str, *, by: str) -> str:
        self._listener(agent)
        info = self.state.agents.agents.get(agent)
        if info is not None and info.status == "paused":
            await self._commit([AgentResumed(at=self._clock(), agent=agent, by=by)])
        self._mailboxes[agent].resume()
        return "running"

    async def kill_thread(self, thread_id: str, *, by: str, reason: str = "") -> bool:
        """Kill a thread: drop its queued messages, cancel its handlers, refuse new messages.
        Returns False if the thread does not exist."""
        thread = self.state.threads.threads.get(thread_id)
        if thread is None:
            return False
        if thread.status == "killed":
            return True
        await self._commit([ThreadKilled(at=self._clock(), thread_id=thread_id, by=by,
                                         reason=reason)])
        self._ledger.closed(thread_id)
        dropped: list[Event] = []
        for mailbox in self._mailboxes.values():
            for delivery in mailbox.drop_thread(thread_id):
                dropped.append(MessageDropped(at=self._clock(), message_id=delivery.message_id,
                                              thread_id=thread_id, reason="thread killed"))
        self._deliverer.cancel_thread(thread_id)
        if dropped:
            await self._commit(dropped)
        return True

    # ------------------------------------------------------------ waiting and stopping

    def _idle(self) -> bool:
        return (not self._accepting and self._ledger.idle
                and all(m.idle for m in self._mailboxes.values()))

    async def wait_idle(self) -> None:
        """Return once nothing is being accepted or handled and nothing deliverable waits."""
        while not self._idle():
            await self._signal.wait()

    def mailbox(self, name: str) -> Mailbox:
        return self._mailboxes[name]

    async def _stop(self, reason: str) -> None:
        self._stopping = True
        for mailbox in self._mailboxes.values():
            mailbox.pause()  # not recorded: queued messages stay pending and are redelivered

        async def in_flight_done() -> None:
            while self._deliverer.in_handler or self._accepting:
                await self._signal.wait()

        try:
            await asyncio.wait_for(in_flight_done(), self._stop_timeout)
        except TimeoutError:
            _log.warning("stopping: %d handlers still running after %gs; cancelling them",
                         len(self._deliverer.in_handler), self._stop_timeout)
        for task in self._workers:
            task.cancel()
        try:
            await self._commit([OrganismStopped(at=self._clock(), reason=reason)])
        except LogError as exc:
            _log.error("could not record OrganismStopped: %s", exc)
            return
        folder = self._snapshots()
        if folder is not None:
            # A snapshot makes the next start fast; it is an optimisation only. Taken here, in
            # the loop, so that nothing changes the state while it is written.
            try:
                save_snapshot(folder, self.state)
            except OSError as exc:
                _log.warning("could not save a snapshot in %s: %s", folder, exc)


def _unwrap(payload: etree._Element) -> etree._Element:
    """A handler or client that passes a whole envelope gets its payload taken out; the
    envelope's meta (from, thread, id) is ignored: the bus owns identity."""
    if payload.tag == f"{{{ENVELOPE_NS}}}message":
        children = [c for c in payload if isinstance(c.tag, str)]
        if len(children) == 2:
            return children[1]
    return payload


def loaded_event(organism: Organism, *, at: float) -> OrganismLoaded:
    budgets = organism.budgets
    return OrganismLoaded(
        at=at, name=organism.name, digest=organism.digest, source=organism.source,
        budgets={"thread_tokens": budgets.thread_tokens, "agent_tokens": budgets.agent_tokens,
                 "organism_tokens": budgets.organism_tokens},
        listeners={name: listener.summary() for name, listener in organism.listeners.items()},
    )


@asynccontextmanager
async def open_pump(organism: Organism, log: EventLog, *, clock: Clock = system_clock,
                    mailbox_capacity: int = 1000, stop_timeout: float = 10.0
                    ) -> AsyncIterator[Pump]:
    """Run ``organism`` on ``log`` for the duration of the ``async with`` block."""
    pump = Pump(organism=organism, log=log, clock=clock, mailbox_capacity=mailbox_capacity,
                stop_timeout=stop_timeout)
    await pump._start()
    async with asyncio.TaskGroup() as group:
        for name, listener in organism.listeners.items():
            for _ in range(listener.concurrency):
                pump._workers.append(group.create_task(pump._deliverer.worker(name),
                                                       name=f"worker:{name}"))
        try:
            yield pump
        finally:
            await pump._stop("stopped")

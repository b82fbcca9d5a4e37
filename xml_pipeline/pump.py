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
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from lxml import etree

import xml_pipeline
from xml_pipeline.envelope import (
    ENVELOPE_NS,
    build_envelope,
    format_timestamp,
    parse_envelope,
    serialize_payload,
)
from xml_pipeline.errors import (
    BusyError,
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
    HandlerFailed,
    HandlerSucceeded,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    MessageDropped,
    MessageRejected,
    MessageRetried,
    OrganismLoaded,
    OrganismStarted,
    OrganismStopped,
    ThreadCompleted,
    ThreadKilled,
)
from xml_pipeline.handlers import Context, HandlerInfo, Payload, coerce_payload, system_error
from xml_pipeline.ids import IdFactory
from xml_pipeline.log import EventLog
from xml_pipeline.mailbox import Delivery, Mailbox
from xml_pipeline.organism import RESERVED_SENDERS, Listener, Organism
from xml_pipeline.state import State, replay
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
        self.state = State()
        self._clock = clock
        self._ids = IdFactory(clock=clock)
        self._capacity = mailbox_capacity
        self._stop_timeout = stop_timeout
        self._mailboxes: dict[str, Mailbox] = {}
        self._unfolded: dict[int, Event] = {}
        self._in_handler: dict[str, tuple[asyncio.Task[Any], Delivery]] = {}
        self._killed: set[str] = set()  # message ids cancelled by a thread kill
        self._accepting = 0
        self._appending = 0
        self._completing: set[str] = set()  # threads whose ThreadCompleted is on its way
        self._open: dict[str, int] = {}  # open messages per thread, ahead of the fold
        self._buffer: list[tuple[list[Event], asyncio.Future[list[int]]]] = []
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._pending_keys: dict[str, Accepted] = {}
        self._fault: BaseException | None = None
        self._stopping = False
        self._signal = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._loggers: dict[str, logging.Logger] = {}

    # ------------------------------------------------------------ commit = append, then fold

    def _commit_soon(self, events: list[Event]) -> asyncio.Future[list[int]]:
        """Append ``events`` soon, in call order; they are folded into ``state`` once durable.

        Every commit made in one turn of the event loop shares one append (one write batch,
        one fold). Returns a future of the events' positions, done after they are folded."""
        future: asyncio.Future[list[int]] = self._loop.create_future()
        self._buffer.append((events, future))
        self._appending += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    async def _commit(self, events: list[Event]) -> list[int]:
        """Append ``events`` and return once they are durable and folded."""
        return await asyncio.shield(self._commit_soon(events))

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        events = [event for part, _ in batch for event in part]
        try:
            future = self.log.append_nowait(events)
        except Exception as exc:  # a closed or failed log: nothing was appended
            self._failed(batch, exc)
            return
        future.add_done_callback(partial(self._fold, batch))

    def _failed(self, batch: list[tuple[list[Event], asyncio.Future[list[int]]]],
                exc: BaseException) -> None:
        self._appending -= len(batch)
        self._fault = exc
        _log.error("an append failed; its events were not recorded: %s", exc)
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here: fire-and-forget commits log it above
        self._notify()

    def _fold(self, batch: list[tuple[list[Event], asyncio.Future[list[int]]]],
              future: asyncio.Future[list[int]]) -> None:
        if future.cancelled():
            self._failed(batch, asyncio.CancelledError())
            return
        error = future.exception()
        if error is not None:
            self._failed(batch, error)
            return
        self._appending -= len(batch)
        positions = future.result()
        unfolded = self._unfolded
        for position, event in zip(positions, (e for part, _ in batch for e in part),
                                   strict=True):
            unfolded[position] = event
        state = self.state
        finished: list[str] = []
        while (following := state.position + 1) in unfolded:
            event = unfolded.pop(following)
            state.apply(following, event)
            if isinstance(event, _OUTCOMES):
                message = state.threads.messages.get(event.message_id)
                if message is not None:
                    finished.append(message.thread_id)
            elif isinstance(event, ThreadCompleted):
                self._completing.discard(event.thread_id)
        start = 0
        for part, part_future in batch:
            if not part_future.done():
                part_future.set_result(positions[start:start + len(part)])
            start += len(part)
        # A thread whose last open message just finished is complete (if the worker did not
        # already record it with the outcome).
        for thread_id in finished:
            thread = state.threads.threads.get(thread_id)
            if (thread is not None and thread.status == "active" and thread.open_count == 0
                    and thread_id not in self._completing):
                self._completing.add(thread_id)
                self._commit_soon([ThreadCompleted(at=self._clock(), thread_id=thread_id)])
        self._notify()

    def _outcome(self, thread_id: str, events: list[Event]) -> list[Event]:
        """``events`` (closing one message of ``thread_id``), plus ``ThreadCompleted`` when that
        was the thread's last open message, so both share one append."""
        remaining = self._open.get(thread_id, 0) - 1
        if remaining > 0:
            self._open[thread_id] = remaining
            return events
        self._open.pop(thread_id, None)
        if thread_id in self._completing:
            return events
        self._completing.add(thread_id)
        return [*events, ThreadCompleted(at=self._clock(), thread_id=thread_id)]

    def _notify(self) -> None:
        self._signal.set()
        self._signal = asyncio.Event()

    # ------------------------------------------------------------ start and recovery

    async def _start(self) -> None:
        self.state = await replay(self.log)
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
        self._open = {thread_id: thread.open_count
                      for thread_id, thread in self.state.threads.threads.items()
                      if thread.open_count > 0}

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
                first = threads.messages[threads.idempotency[idempotency_key]]
                return Accepted(first.message_id, first.thread_id, duplicate=True)
            if idempotency_key in self._pending_keys:
                pending = self._pending_keys[idempotency_key]
                return Accepted(pending.message_id, pending.thread_id, duplicate=True)
        outbound = to in RESERVED_SENDERS
        if not outbound:
            listener = self._listener(to)
            if validate:
                listener.schema.validate(payload)
        if thread_id is not None:
            thread = threads.threads.get(thread_id)
            if thread is not None and thread.status == "killed":
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
            message_id = self._ids.new()
            thread = thread_id or self._ids.new()
            now = self._clock()
            body = serialize_payload(payload)
            envelope = build_envelope(id=message_id, sender=sender, to=to, thread=thread,
                                      parent=parent_id, sent=format_timestamp(now),
                                      payload=body)
            event = MessageAccepted(at=now, message_id=message_id, thread_id=thread,
                                    parent_id=parent_id, sender=sender, to=to,
                                    payload_type=etree.QName(payload).localname,
                                    envelope=envelope.decode("utf-8"),
                                    idempotency_key=idempotency_key)
            try:
                future = self._commit_soon([event])
            except BaseException:
                if mailbox is not None:
                    mailbox.release()
                raise
            accepted = Accepted(message_id, thread)
            if mailbox is not None:
                self._open[thread] = self._open.get(thread, 0) + 1
                self._completing.discard(thread)
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
            if delivery.message_id in self._killed or self._thread_killed(delivery.thread_id):
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
                if threads.messages[m].parent_id == delivery.message_id
                and threads.messages[m].sender == listener.name
            ]
        if index < len(delivery.prior_sends):
            earlier = self.state.threads.messages[delivery.prior_sends[index]]
            if earlier.to == to:
                return earlier.message_id
        return None

    def _thread_killed(self, thread_id: str) -> bool:
        thread = self.state.threads.threads.get(thread_id)
        return thread is not None and thread.status == "killed"

    # ------------------------------------------------------------ delivery

    async def _worker(self, name: str) -> None:
        while True:
            mailbox = self._mailboxes.get(name)
            if mailbox is None:
                return
            delivery = await mailbox.get()
            try:
                await self._deliver(name, delivery)
            finally:
                mailbox.done(delivery)
                self._notify()

    async def _deliver(self, name: str, delivery: Delivery) -> None:
        # Outcome events are appended without waiting: the log keeps their order, the fold
        # applies them once durable, and a crash before that only means a redelivery.
        while True:
            listener = self.organism.listeners.get(name)
            if listener is None:
                self._commit_soon(self._outcome(delivery.thread_id, [MessageDeadLettered(
                    at=self._clock(), message_id=delivery.message_id, listener=name,
                    reason=f"Listener {name!r} was removed from the organism.")]))
                return
            if self._thread_killed(delivery.thread_id):
                self._commit_soon([MessageDropped(at=self._clock(),
                                                  message_id=delivery.message_id,
                                                  thread_id=delivery.thread_id,
                                                  reason="thread killed")])
                return
            delivery.attempts += 1
            attempt = delivery.attempts
            self._commit_soon([MessageDelivered(at=self._clock(), message_id=delivery.message_id,
                                                listener=name, attempt=attempt,
                                                redelivery=delivery.redelivery)])
            started = time.perf_counter()
            error = await self._call(listener, delivery, attempt)
            if delivery.message_id in self._killed:
                self._killed.discard(delivery.message_id)
                self._commit_soon([MessageDropped(at=self._clock(),
                                                  message_id=delivery.message_id,
                                                  thread_id=delivery.thread_id,
                                                  reason="thread killed")])
                return
            if error is None:
                self._commit_soon(self._outcome(delivery.thread_id, [HandlerSucceeded(
                    at=self._clock(), message_id=delivery.message_id, listener=name,
                    duration_ms=(time.perf_counter() - started) * 1000)]))
                return
            will_retry = attempt <= listener.retries.max
            events: list[Event] = [HandlerFailed(at=self._clock(), message_id=delivery.message_id,
                                                 listener=name, attempt=attempt, error=error,
                                                 will_retry=will_retry)]
            delay = listener.retries.backoff * (2 ** (attempt - 1))
            if will_retry:
                events.append(MessageRetried(at=self._clock(), message_id=delivery.message_id,
                                             listener=name, attempt=attempt + 1, delay=delay))
            else:
                events.append(MessageDeadLettered(at=self._clock(),
                                                  message_id=delivery.message_id,
                                                  listener=name, reason=error))
                events = self._outcome(delivery.thread_id, events)
            self._commit_soon(events)
            if not will_retry:
                return
            await asyncio.sleep(delay)

    async def _call(self, listener: Listener, delivery: Delivery, attempt: int) -> str | None:
        """Run the handler once; the error text if it failed, None if it succeeded (or was
        cancelled by a thread kill, which the caller checks)."""
        info = HandlerInfo(name=listener.name, peers=listener.peers,
                           message_id=delivery.message_id, thread=delivery.thread_id,
                           sender=delivery.sender, parent=delivery.parent_id,
                           redelivery=delivery.redelivery, attempt=attempt)

        async def send(to: str, data: Payload, is_reply: bool) -> str | None:
            return await self._send(listener, delivery, to, data, is_reply)

        ctx = Context(info=info, send=send, logger=self._logger(listener.name))
        delivery.sends = 0
        handler = listener.handler_fn
        if handler is None:
            return f"Listener {listener.name!r} has no handler."
        task = asyncio.current_task()
        assert task is not None
        self._in_handler[delivery.message_id] = (task, delivery)
        try:
            async with asyncio.timeout(listener.timeout):
                await handler(delivery.payload, ctx)
        except asyncio.CancelledError:
            if delivery.message_id not in self._killed:
                raise
            task.uncancel()
            return None
        except TimeoutError:
            return f"The handler timed out after {listener.timeout:g}s."
        except (BusyError, LogError):
            raise
        except Exception as exc:  # the handler's own failure, recorded with its text
            return f"{type(exc).__name__}: {exc}"
        finally:
            del self._in_handler[delivery.message_id]
        if delivery.message_id in self._killed and task.cancelling():
            task.uncancel()
        return None

    def _logger(self, name: str) -> logging.Logger:
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = logging.getLogger(f"xml_pipeline.listener.{name}")
        return logger

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
        self._open.pop(thread_id, None)
        dropped: list[Event] = []
        for mailbox in self._mailboxes.values():
            for delivery in mailbox.drop_thread(thread_id):
                dropped.append(MessageDropped(at=self._clock(), message_id=delivery.message_id,
                                              thread_id=thread_id, reason="thread killed"))
        for message_id, (task, delivery) in list(self._in_handler.items()):
            if delivery.thread_id == thread_id:
                self._killed.add(message_id)
                task.cancel()
        if dropped:
            await self._commit(dropped)
        return True

    # ------------------------------------------------------------ waiting and stopping

    def _idle(self) -> bool:
        return (not self._accepting and not self._appending and not self._unfolded
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
            while self._in_handler or self._accepting:
                await self._signal.wait()

        try:
            await asyncio.wait_for(in_flight_done(), self._stop_timeout)
        except TimeoutError:
            _log.warning("stopping: %d handlers still running after %gs; cancelling them",
                         len(self._in_handler), self._stop_timeout)
        for task in self._workers:
            task.cancel()
        try:
            await self._commit([OrganismStopped(at=self._clock(), reason=reason)])
        except LogError as exc:
            _log.error("could not record OrganismStopped: %s", exc)


_OUTCOMES = (HandlerSucceeded, MessageDeadLettered, MessageDropped)


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
                pump._workers.append(group.create_task(pump._worker(name),
                                                       name=f"worker:{name}"))
        try:
            yield pump
        finally:
            await pump._stop("stopped")

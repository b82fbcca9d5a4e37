"""Routing: the one path every message takes into the log.

Injected or sent by a handler, a message is routed (the listener exists, the peer is declared,
the thread is open), its payload validated against the target's schema, and ``MessageAccepted``
appended; a refusal is appended as ``MessageRejected`` with the reason. The message enters the
target's mailbox once its event is durable. A handler's refused send comes back to it as a
``<SystemError>`` message.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from lxml import etree

from xml_pipeline.config import RESERVED_SENDERS, Listener, Organism
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
    LeaseLostError,
    LogError,
    LogWriteError,
    ThreadClosedError,
    UndeclaredPeerError,
    UnknownListenerError,
    XmlPipelineError,
)
from xml_pipeline.events import MessageAccepted, MessageRejected
from xml_pipeline.ids import IdFactory
from xml_pipeline.runtime.handlers import Payload, coerce_payload, system_error
from xml_pipeline.runtime.ledger import Ledger
from xml_pipeline.runtime.mailbox import Delivery, Mailbox
from xml_pipeline.state.scheduling import Lease, check
from xml_pipeline.types import Clock

__all__ = ["Accepted", "Router"]

RAW_CAP = 4096  # bytes of rejected input kept in MessageRejected
MAX_SYSTEM_ERRORS = 3  # SystemErrors in a row before the bus stops answering bad sends
MAX_KEY = 256  # characters of an idempotency key


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
    return _text(str(data)[:RAW_CAP])


def _text(value: str) -> str:
    """``value`` as storable UTF-8 text: lone surrogates (from a handler's Python string, say)
    become backslash escapes instead of failing the append."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _maybe(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc).rstrip(".")


def _did_you_mean(word: str, names: Any) -> str:
    close = difflib.get_close_matches(word, list(names), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _unwrap(payload: etree._Element) -> etree._Element:
    """A handler or client that passes a whole envelope gets its payload taken out; the
    envelope's meta (from, thread, id) is ignored: the bus owns identity."""
    if payload.tag == f"{{{ENVELOPE_NS}}}message":
        children = [c for c in payload if isinstance(c.tag, str)]
        if len(children) == 2:
            return children[1]
    return payload


class Router:
    def __init__(self, *, ledger: Ledger, clock: Clock, organism: Callable[[], Organism],
                 mailboxes: dict[str, Mailbox], killed: set[str]) -> None:
        self._ledger = ledger
        self._commit_soon = ledger.commit_soon
        self._clock = clock
        self._ids = IdFactory(clock=clock)
        self._organism = organism
        self._mailboxes = mailboxes
        self._killed = killed
        self._accepting = 0
        self._pending_keys: dict[str, Accepted] = {}

    @property
    def busy(self) -> bool:
        """True while a message is between routing and its append."""
        return self._accepting > 0

    def _thread_killed(self, thread_id: str) -> bool:
        thread = self._ledger.state.threads.threads.get(thread_id)
        return thread is not None and thread.status == "killed"

    async def inject(self, data: Payload, *, to: str | None = None, thread_id: str | None = None,
                     sender: str = "api", idempotency_key: str | None = None,
                     wait: bool = False) -> Accepted:
        """Accept a message from outside: a full envelope (``to`` None) or a payload for ``to``.

        Returns once the message is durable. Raises an ``XmlError``/``RoutingError`` subclass
        (recorded as ``MessageRejected``) or, when the target's mailbox is full, waits for room
        (``wait=True``) or raises ``MailboxFullError`` (not recorded: try again later). While
        the log cannot be written, raises ``LogWriteError`` at once.
        """
        fault = self._ledger.fault
        if fault is not None:
            raise LogWriteError(
                f"The event log cannot be written ({_reason(fault)}), so no message is "
                "accepted until it can; nothing was acknowledged. Retry shortly.")
        try:
            if to is not None and not wait:
                self._refuse_early(to, idempotency_key)
            if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY:
                raise EnvelopeError(
                    f"The idempotency key is {len(idempotency_key)} characters long; use 1 to "
                    f"{MAX_KEY} (a UUID or an order number), or leave it out.")
            if to is None:
                envelope = parse_envelope(data if isinstance(data, str | bytes) else
                                          etree.tostring(data), limits=self._organism().limits)
                to, payload = envelope.to, envelope.payload
                thread_id = thread_id or envelope.thread
            else:
                listener = self.listener(to)
                payload = coerce_payload(data, listener.schema, limits=self._organism().limits)
                payload = _unwrap(payload)
            return await self._accept(payload=payload, to=to, sender=sender,
                                      thread_id=thread_id, parent_id=None,
                                      idempotency_key=idempotency_key, wait=wait)
        except (BusyError, LogError):
            raise
        except XmlPipelineError as exc:
            await self.reject(exc, raw=data, sender=sender, to=to, thread_id=thread_id,
                               parent_id=None)
            raise

    def _refuse_early(self, to: str, idempotency_key: str | None) -> None:
        """Refuse a message for a full mailbox before parsing and validating it: under
        overload, refusals are most of the traffic and should cost little. A retry whose key
        is known still gets its original ids."""
        mailbox = self._mailboxes.get(to)
        if mailbox is None or not mailbox.full:
            return
        if idempotency_key is not None and (
                idempotency_key in self._ledger.state.threads.idempotency
                or idempotency_key in self._pending_keys):
            return
        raise mailbox.full_error()

    def listener(self, name: str) -> Listener:
        listener = self._organism().listeners.get(name)
        if listener is None:
            raise UnknownListenerError(
                f"There is no listener {name!r} in organism {self._organism().name!r}."
                f"{_did_you_mean(name, self._organism().listeners)} Listeners: "
                f"{', '.join(self._organism().listeners)}."
            )
        return listener

    async def _accept(self, *, payload: etree._Element, to: str, sender: str,
                      thread_id: str | None, parent_id: str | None,
                      idempotency_key: str | None, wait: bool, validate: bool = True,
                      system_depth: int = 0, durable: bool = True,
                      outbound: bool = False) -> Accepted:
        """Route, check and append one message. With ``durable`` it returns once the message
        is in the log; otherwise at once (it reaches the mailbox when durable either way).

        Only listeners are addressable: ``outbound`` (a reply to the API client, CLI or bus
        that sent the parent, decided by ``send``) is the one way to a name of the bus."""
        threads = self._ledger.state.threads
        if idempotency_key is not None:
            if idempotency_key in threads.idempotency:
                message_id, thread_of = threads.idempotency[idempotency_key]
                return Accepted(message_id, thread_of, duplicate=True)
            if idempotency_key in self._pending_keys:
                pending = self._pending_keys[idempotency_key]
                return Accepted(pending.message_id, pending.thread_id, duplicate=True)
        if not outbound:
            listener = self.listener(to)
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
                payload=payload, envelope=envelope, system_depth=system_depth,
                schema_digest=self._organism().listeners[to].schema.digest)
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
        self._ledger.notify()

    async def reject(self, exc: XmlPipelineError, *, raw: Any, sender: str | None,
                     to: str | None, thread_id: str | None, parent_id: str | None,
                     durable: bool = True, code: str | None = None) -> None:
        future = self._commit_soon([MessageRejected(
            at=self._clock(), reason=code or exc.code, error=_text(exc.message),
            raw=_raw_text(raw), sender=_maybe(sender), to=_maybe(to),
            thread_id=_maybe(thread_id), parent_id=_maybe(parent_id))])
        if durable:
            await asyncio.shield(future)

    async def send(self, listener: Listener, delivery: Delivery, lease: Lease, to: str,
                   data: Payload) -> str | None:
        """A handler's send, under ``lease``. The bus decides that a send to the sender of the
        message being handled is a reply (allowed without declaring the sender a peer, and
        the one way to a name of the bus). Returns the new message id, or None if refused.
        Raises ``LeaseLostError`` (and records the refusal) once the lease is not held: the
        call is over, its thread was killed, or another holder has the message."""
        try:
            if delivery.holding is not lease:
                raise LeaseLostError(
                    f"Listener {listener.name!r} sent to {to!r} under lease {lease.lease_id} "
                    f"of message {delivery.message_id}, which it no longer holds (the handler "
                    "call is over, timed out, or its thread was killed); nothing was sent.")
            check(self._ledger.state.scheduling, lease, pending=True)
            if (delivery.message_id in self._killed
                    or self._thread_killed(delivery.thread_id)):
                raise ThreadClosedError(f"Thread {delivery.thread_id} was killed; the message "
                                        "was not sent.")
            is_reply = to == delivery.sender
            outbound = is_reply and to in RESERVED_SENDERS
            if not outbound:
                target = self.listener(to)
                if not is_reply and to not in listener.peers:
                    peers = ", ".join(listener.peers) or "none"
                    raise UndeclaredPeerError(
                        f"Listener {listener.name!r} may not send to {to!r}: its peers in "
                        f"organism.yaml (line {listener.line}) are: {peers}. Send to a "
                        f"declared peer, or add {to!r} to its peers.")
                payload = coerce_payload(data, target.schema, limits=self._organism().limits)
            elif isinstance(data, Mapping):
                raise XmlPipelineError("A reply to an API client must be XML, not a dict.")
            else:
                payload = coerce_payload(data, listener.schema, limits=self._organism().limits)
            earlier = self._earlier_send(listener, delivery, to)
            if earlier is not None:
                return earlier
            accepted = await self._accept(payload=_unwrap(payload), to=to,
                                          sender=listener.name, thread_id=delivery.thread_id,
                                          parent_id=delivery.message_id, idempotency_key=None,
                                          wait=True, durable=False, outbound=outbound)
            return accepted.message_id
        except (BusyError, LogError):
            raise
        except XmlPipelineError as exc:
            await self.reject(exc, raw=data if not isinstance(data, Mapping) else repr(data),
                               sender=listener.name, to=to, thread_id=delivery.thread_id,
                               parent_id=delivery.message_id, durable=False)
            if isinstance(exc, LeaseLostError):
                raise
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
            threads = self._ledger.state.threads
            thread = threads.threads.get(delivery.thread_id)
            ids = thread.messages if thread is not None else []
            delivery.prior_sends = [
                m for m in ids
                if (info := threads.messages.get(m)) is not None
                and info.parent_id == delivery.message_id and info.sender == listener.name
            ]
        if index < len(delivery.prior_sends):
            earlier = self._ledger.state.threads.messages.get(delivery.prior_sends[index])
            if earlier is not None and earlier.to == to:
                return earlier.message_id
        return None


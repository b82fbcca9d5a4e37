"""What a handler sees: its payload and a ``Context``.

A handler is ``async def handler(payload, ctx)``: ``payload`` is the validated lxml element,
``ctx`` tells who sent it, in which thread, and lets the handler ``send(to, payload)`` to its
declared peers or ``reply(payload)`` to the sender. A payload may be an lxml element, XML text,
or a dict (``{"text": ...}`` or ``{"Shout": {"text": ...}}``) converted through the target's
schema. The bus writes ``from``, ``thread``, ``id`` and ``parent``; a handler cannot set them.

A send that the bus refuses (undeclared peer, invalid payload, closed thread) is not sent:
``send`` returns ``None``, the refusal is recorded in the log, and the handler's listener
receives a ``<SystemError>`` message explaining why, so that an LLM agent can correct itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from lxml import etree

from xml_pipeline.errors import PayloadError, XmlTooLargeError
from xml_pipeline.schemas import PayloadSchema
from xml_pipeline.xmlsafe import XmlLimits, parse_xml

__all__ = [
    "SYSTEM_NS",
    "Context",
    "HandlerInfo",
    "coerce_payload",
    "is_system_error",
    "system_error",
]

SYSTEM_NS = "urn:xml-pipeline:system:v1"
_SYSTEM_ERROR = f"{{{SYSTEM_NS}}}SystemError"

Payload: TypeAlias = etree._Element | str | bytes | Mapping[str, Any]
SendFunction = Callable[[str, Payload], Awaitable[str | None]]


def system_error(*, code: str, message: str, rejected_to: str | None = None) -> etree._Element:
    """The ``<SystemError>`` payload delivered to a listener whose message was refused."""
    root = etree.Element(_SYSTEM_ERROR, nsmap={None: SYSTEM_NS})
    etree.SubElement(root, f"{{{SYSTEM_NS}}}code").text = code
    etree.SubElement(root, f"{{{SYSTEM_NS}}}message").text = message
    if rejected_to is not None:
        etree.SubElement(root, f"{{{SYSTEM_NS}}}to").text = rejected_to
    return root


def is_system_error(payload: etree._Element) -> bool:
    return payload.tag == _SYSTEM_ERROR


def coerce_payload(payload: Payload, schema: PayloadSchema, *, limits: XmlLimits
                   ) -> etree._Element:
    """An lxml element from an element, XML text or a dict. Raises ``XmlError``/``PayloadError``;
    does not validate (the pump does, once, for every message). Whatever its form, a payload
    is held to ``limits.max_bytes`` as XML text."""
    if isinstance(payload, etree._Element):
        return _within(payload, limits)
    if isinstance(payload, str | bytes):
        return parse_xml(payload, limits=limits)
    if isinstance(payload, Mapping):
        data: Any = payload
        if len(payload) == 1 and schema.root in payload:
            data = payload[schema.root]
        try:
            element = schema.xmlschema().encode(data, path=schema.root,
                                                etree_element_class=etree.Element)
        except Exception as exc:  # xmlschema raises several unrelated types here
            reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
            raise PayloadError(
                f"The dict does not fit <{schema.root}> ({schema.path.name}): {reason}"
            ) from exc
        if isinstance(element, tuple):  # (element, errors) in lax mode
            element = element[0]
        return _within(element, limits)
    raise PayloadError(
        f"A payload must be an lxml element, XML text or a dict, not {type(payload).__name__}."
    )


def _within(element: etree._Element, limits: XmlLimits) -> etree._Element:
    """``element``, if its XML text is within ``limits.max_bytes`` (as text payloads are)."""
    size = len(etree.tostring(element, encoding="utf-8", with_tail=False))
    if size > limits.max_bytes:
        raise XmlTooLargeError(
            f"The payload <{etree.QName(element).localname}> is {size} bytes as XML, over the "
            f"limit of {limits.max_bytes} bytes; send a smaller payload or raise "
            "limits.max_bytes in organism.yaml.")
    return element


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerInfo:
    """Facts about the message being handled."""

    name: str
    peers: tuple[str, ...]
    message_id: str
    thread: str
    sender: str
    parent: str | None
    redelivery: bool
    attempt: int
    deadline: float | None = None


class Context:
    """Passed to every handler call. Only ``send`` and ``reply`` produce messages."""

    __slots__ = ("_info", "_send", "logger", "sent")

    def __init__(self, *, info: HandlerInfo, send: SendFunction, logger: logging.Logger
                 ) -> None:
        self._info = info
        self._send = send
        self.logger = logger
        self.sent: list[str] = []

    @property
    def name(self) -> str:
        """This listener's name."""
        return self._info.name

    @property
    def peers(self) -> tuple[str, ...]:
        return self._info.peers

    @property
    def message_id(self) -> str:
        return self._info.message_id

    @property
    def thread(self) -> str:
        return self._info.thread

    @property
    def sender(self) -> str:
        return self._info.sender

    @property
    def parent(self) -> str | None:
        return self._info.parent

    @property
    def redelivery(self) -> bool:
        """True if this message was delivered before (a crash or restart came in between)."""
        return self._info.redelivery

    @property
    def attempt(self) -> int:
        return self._info.attempt

    @property
    def deadline(self) -> float | None:
        """When this delivery's lease ends (the handler's timeout, seconds since the epoch):
        after it, ``send`` and ``reply`` raise ``LeaseLostError``."""
        return self._info.deadline

    async def send(self, to: str, payload: Payload) -> str | None:
        """Send ``payload`` to peer ``to`` in this thread; the new message id, or None if the
        bus refused it (the refusal comes back to this listener as a ``<SystemError>``)."""
        message_id = await self._send(to, payload)
        if message_id is not None:
            self.sent.append(message_id)
        return message_id

    async def reply(self, payload: Payload) -> str | None:
        """Answer the sender of the message being handled (allowed even if not a peer)."""
        message_id = await self._send(self._info.sender, payload)
        if message_id is not None:
            self.sent.append(message_id)
        return message_id

"""Envelopes: the ``<message>`` every piece of traffic travels in.

``parse_envelope`` turns untrusted bytes into an ``Envelope`` (hardened parse, structure checks,
envelope XSD); ``build_envelope`` writes the bytes of an envelope whose meta fields the bus owns.
The payload is parsed once and the element is passed along; envelopes the bus writes round-trip
exactly (build, parse, validate, compare).
"""

from __future__ import annotations

import re
import time
from copy import deepcopy
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lxml import etree

from xml_pipeline.errors import EnvelopeError
from xml_pipeline.xmlsafe import XmlLimits, parse_xml, readable_path

__all__ = [
    "ENVELOPE_NS",
    "LOGGED_LIMITS",
    "Envelope",
    "build_envelope",
    "envelope_schema",
    "format_timestamp",
    "is_valid_id",
    "is_valid_name",
    "parse_envelope",
    "serialize_payload",
]

ENVELOPE_NS = "urn:xml-pipeline:envelope:v1"
_PREFIX = f"{{{ENVELOPE_NS}}}"
_MESSAGE = f"{_PREFIX}message"
_META = f"{_PREFIX}meta"
_META_FIELDS = ("id", "from", "to", "thread", "parent", "sent")
_META_TAGS = {f"{_PREFIX}{name}": name for name in _META_FIELDS}
# The same rules as the Name and Id types of envelope.xsd, and the shape of an xs:dateTime
# (the XSD checks its ranges when the envelope is read).
_NAME_RE = r"[A-Za-z][A-Za-z0-9_.\-]{0,63}"
_ID_RE = r"[A-Za-z0-9_.:\-]{1,128}"
_SENT_RE = (r"-?[0-9]{4,}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
            r"(?:Z|[+\-][0-9]{2}:[0-9]{2})?")
_NAME = re.compile(_NAME_RE + r"\Z")
_ID = re.compile(_ID_RE + r"\Z")
_SENT = re.compile(_SENT_RE + r"\Z")
# id, from, to, thread and sent joined by spaces (which none of them may contain): one match
# checks them all.
_BUS_FIELDS = re.compile(rf"{_ID_RE} {_NAME_RE} {_NAME_RE} {_ID_RE} {_SENT_RE}\Z")
_TAG_NAME_END = re.compile(rb"[ \t\r\n/>]")

_NAME_RULE = "a listener name starts with a letter, then up to 63 letters, digits, '_', '.' or '-'"
_ID_RULE = "an id is 1 to 128 letters, digits, '_', '.', ':' or '-'"
_SENT_RULE = ("a timestamp is an xs:dateTime such as '2026-11-26T05:00:00.123Z'; "
              "make it with format_timestamp(seconds)")

_DEFAULT_LIMITS = XmlLimits()
#: For reading back envelopes the bus wrote to its log: their payloads were held to the limits
#: in force when they were accepted, and the envelope around a payload at ``max_bytes`` is
#: larger than that, as is everything accepted before the limits were lowered.
LOGGED_LIMITS = XmlLimits(max_bytes=2**62, max_depth=255)
_schema: list[etree.XMLSchema] = []


def envelope_schema() -> etree.XMLSchema:
    """The compiled envelope XSD (loaded once from the package)."""
    if not _schema:
        data = resources.files("xml_pipeline").joinpath("envelope.xsd").read_bytes()
        _schema.append(etree.XMLSchema(etree.fromstring(data)))
    return _schema[0]


def is_valid_name(name: str) -> bool:
    """True if ``name`` can be a listener name (and so appear in ``<from>``/``<to>``)."""
    return bool(_NAME.match(name))


def is_valid_id(text: str) -> bool:
    """True if ``text`` can be a message or thread id (``<id>``, ``<thread>``, ``<parent>``)."""
    return bool(_ID.match(text))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Envelope:
    """A parsed, structurally valid envelope. Fields a client left out are ``None``."""

    to: str
    payload: etree._Element
    id: str | None = None
    sender: str | None = None
    thread: str | None = None
    parent: str | None = None
    sent: str | None = None

    @property
    def payload_tag(self) -> str:
        return str(self.payload.tag)


def _local(tag: object) -> str:
    text = str(tag)
    return text.split("}", 1)[1] if text.startswith("{") else text


def _namespace(tag: object) -> str | None:
    text = str(tag)
    return text[1:].split("}", 1)[0] if text.startswith("{") else None


def parse_envelope(data: bytes | str, *, limits: XmlLimits = _DEFAULT_LIMITS) -> Envelope:
    """Parse and check an envelope: hardened parse, envelope XSD, exactly one payload, which
    is not in the envelope's namespace. Raises an ``XmlError`` subclass naming what and where
    (``EnvelopeError`` for a well-formed document that is not a valid envelope)."""
    root = parse_xml(data, limits=limits)
    if root.tag != _MESSAGE:
        ns = _namespace(root.tag)
        if _local(root.tag) == "message":
            found = f"namespace {ns!r}" if ns else "no namespace"
            raise EnvelopeError(
                f"The <message> element is in {found}; an envelope must be in namespace "
                f"{ENVELOPE_NS!r} (add xmlns=\"{ENVELOPE_NS}\").",
                where="/message",
            )
        raise EnvelopeError(
            f"The root element is <{_local(root.tag)}>, not an envelope; wrap the payload in "
            f"<message xmlns=\"{ENVELOPE_NS}\"><meta><to>listener</to></meta>...</message>.",
            where=f"/{_local(root.tag)}",
        )
    schema = envelope_schema()
    if not schema.validate(root):
        _diagnose(root, schema)
    # Valid against the XSD: element children are exactly <meta> and one payload, though
    # comments or processing instructions may sit between them.
    elements = root.xpath("*") if len(root) != 2 else root
    meta_element, payload = elements[0], elements[1]
    if payload.tag.startswith(_PREFIX):
        _refuse_envelope_namespace(payload)
    meta: dict[str, str | None] = dict.fromkeys(_META_FIELDS)
    for child in meta_element:
        key = _META_TAGS.get(child.tag)
        if key is not None:
            # A comment inside a field splits its text; the XSD saw the joined value.
            text = child.text if not len(child) else "".join(child.itertext())
            meta[key] = (text or "").strip()
    return Envelope(
        to=meta["to"] or "",
        payload=payload,
        id=meta["id"],
        sender=meta["from"],
        thread=meta["thread"],
        parent=meta["parent"],
        sent=meta["sent"],
    )


def _refuse_envelope_namespace(payload: etree._Element) -> None:
    name = _local(payload.tag)
    raise EnvelopeError(
        f"The payload <{name}> is in the envelope's namespace {ENVELOPE_NS!r}, so no listener "
        f"schema can match it; write <{name} xmlns=\"\"> for a payload without a namespace, or "
        "declare its schema's namespace on it.",
        where=readable_path(payload),
    )


def _diagnose(root: etree._Element, schema: etree.XMLSchema) -> None:
    """Raise the most specific ``EnvelopeError`` for an envelope that failed its XSD."""
    children = [child for child in root if isinstance(child.tag, str)]
    if not children or children[0].tag != _META:
        raise EnvelopeError(
            "The envelope has no <meta> as its first child; put "
            "<meta><to>listener</to></meta> before the payload.",
            where="/message",
        )
    payloads = children[1:]
    if not payloads:
        raise EnvelopeError(
            "The envelope has no payload; put exactly one payload element after <meta>.",
            where="/message",
        )
    if len(payloads) > 1:
        names = ", ".join(f"<{_local(p.tag)}>" for p in payloads)
        raise EnvelopeError(
            f"The envelope has {len(payloads)} payloads ({names}); send exactly one payload "
            "element per message.",
            where=readable_path(payloads[1]),
        )
    stray = [text.strip() for text in (root.text, *(c.tail for c in root)) if text and text.strip()]
    if stray:
        snippet = stray[0] if len(stray[0]) <= 40 else stray[0][:37].rstrip() + "..."
        raise EnvelopeError(
            f"The envelope has the text {snippet!r} directly inside <message>, where only <meta> "
            "and one payload element may go; move the text into the payload.",
            where="/message",
        )
    entry = schema.error_log[0]
    where = readable_path(root, entry.path) or f"{entry.line}:{entry.column}"
    message = entry.message.replace(_PREFIX, "").strip()
    if not message.endswith("."):
        message += "."
    raise EnvelopeError(f"The envelope is not valid at {where}: {message}", where=where)


def format_timestamp(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, as written in ``<sent>``: 2026-11-26T05:00:00.123Z.

    ``seconds`` (since the Unix epoch) is rounded to the nearest millisecond."""
    whole, millis = divmod(round(seconds * 1000), 1000)
    if whole != _second[0]:  # one strftime per second, not per message
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{millis:03d}Z"


_second: list[Any] = [None, ""]


def serialize_payload(payload: etree._Element) -> bytes:
    """The payload as UTF-8 bytes that keep their namespaces when placed inside an envelope:
    ``parse_envelope`` gives back an element of the same tags, attributes and text.

    The envelope declares a default namespace, which would capture every unprefixed element
    of the payload that has no namespace: the payload element itself, or the children of a
    prefixed payload (``<p:Order xmlns:p="urn:shop"><item/></p:Order>``). lxml leaves the
    needed ``xmlns=""`` out, so unless the payload declares a default namespace of its own,
    ``xmlns=""`` is written on it here. lxml also drops it inside a payload built in memory
    (``SubElement(order, "item")`` under ``nsmap={None: "urn:shop"}``); such elements are
    rewritten with ``xmlns=""``. Raises ``EnvelopeError`` for a payload in the envelope's
    own namespace.
    """
    if payload.tag.startswith(_PREFIX):
        _refuse_envelope_namespace(payload)
    data: bytes = etree.tostring(payload, encoding="utf-8", xml_declaration=False, with_tail=False)
    # Only a non-empty default namespace can capture anything (text that looks like one only
    # costs the exact check).
    if data.count(b' xmlns="') > data.count(b' xmlns=""') and _captured_elements(payload):
        data = etree.tostring(_undeclare_default_namespace(payload), encoding="utf-8",
                              xml_declaration=False, with_tail=False)
    end = data.find(b">")
    if data.find(b' xmlns="', 0, end) < 0:
        found = _TAG_NAME_END.search(data, 1)
        cut = found.start() if found is not None else end
        data = data[:cut] + b' xmlns=""' + data[cut:]
    return data


def _captured_elements(payload: etree._Element) -> list[etree._Element]:
    """No-namespace elements that lxml would write where a default namespace is in scope."""
    return [el for el in payload.iter("{}*") if el.nsmap.get(None)]


def _undeclare_default_namespace(payload: etree._Element) -> etree._Element:
    """A copy of ``payload`` whose captured elements each carry ``xmlns=""``."""
    copy = deepcopy(payload)
    for element in _captured_elements(copy):
        if not element.nsmap.get(None):  # fixed along with a captured ancestor
            continue
        fixed = etree.Element(element.tag, nsmap={None: ""})
        for name, value in element.attrib.items():
            fixed.set(name, value)
        fixed.text, fixed.tail = element.text, element.tail
        fixed.extend(list(element))
        parent = element.getparent()
        if parent is None:
            copy = fixed
        else:
            parent.replace(element, fixed)
    return copy


def _refuse_field(field: str, value: object, rule: str) -> None:
    raise EnvelopeError(
        f"The envelope cannot carry {value!r} in <{field}>: {rule}.",
        where=f"/message/meta/{field}",
    )


def build_envelope(
    *,
    id: str,
    sender: str,
    to: str,
    thread: str,
    payload: etree._Element | bytes,
    sent: str,
    parent: str | None = None,
) -> bytes:
    """The bytes of an envelope with bus-owned meta fields; ``payload`` may be pre-serialised
    with ``serialize_payload``. ``parse_envelope`` gives back equal fields and a payload with
    the same canonical form. Raises ``EnvelopeError`` for a field the envelope XSD would
    refuse (so the bus never writes an envelope it cannot read back)."""
    if not (_BUS_FIELDS.match(f"{id} {sender} {to} {thread} {sent}")
            and (not parent or _ID.match(parent))):
        for field, value, pattern, rule in (
            ("id", id, _ID, _ID_RULE),
            ("from", sender, _NAME, _NAME_RULE),
            ("to", to, _NAME, _NAME_RULE),
            ("thread", thread, _ID, _ID_RULE),
            ("parent", parent or "x", _ID, _ID_RULE),
            ("sent", sent, _SENT, _SENT_RULE),
        ):
            if not pattern.match(value):
                _refuse_field(field, value, rule)
    body = payload if isinstance(payload, bytes) else serialize_payload(payload)
    parent_xml = f"<parent>{parent}</parent>" if parent else ""
    head = (
        f'<message xmlns="{ENVELOPE_NS}"><meta><id>{id}</id><from>{sender}</from>'
        f"<to>{to}</to><thread>{thread}</thread>{parent_xml}<sent>{sent}</sent></meta>"
    )
    return b"".join((head.encode("utf-8"), body, b"</message>"))

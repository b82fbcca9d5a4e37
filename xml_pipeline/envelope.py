"""Envelopes: the ``<message>`` every piece of traffic travels in.

``parse_envelope`` turns untrusted bytes into an ``Envelope`` (hardened parse, structure checks,
envelope XSD); ``build_envelope`` writes the bytes of an envelope whose meta fields the bus owns.
The payload is parsed once and the element is passed along; envelopes the bus writes round-trip
exactly (build, parse, validate, compare).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources

from lxml import etree

from xml_pipeline.errors import EnvelopeError
from xml_pipeline.xmlsafe import XmlLimits, parse_xml, readable_path

__all__ = [
    "ENVELOPE_NS",
    "Envelope",
    "build_envelope",
    "envelope_schema",
    "format_timestamp",
    "is_valid_name",
    "parse_envelope",
    "serialize_payload",
]

ENVELOPE_NS = "urn:xml-pipeline:envelope:v1"
_MESSAGE = f"{{{ENVELOPE_NS}}}message"
_META = f"{{{ENVELOPE_NS}}}meta"
_META_FIELDS = ("id", "from", "to", "thread", "parent", "sent")
_META_TAGS = {f"{{{ENVELOPE_NS}}}{name}": name for name in _META_FIELDS}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}\Z")

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


def parse_envelope(data: bytes | str, *, limits: XmlLimits = XmlLimits()) -> Envelope:
    """Parse and check an envelope. Raises an ``XmlError`` subclass naming what and where."""
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
    meta: dict[str, str | None] = dict.fromkeys(_META_FIELDS)
    for child in meta_element:
        key = _META_TAGS.get(child.tag)
        if key is not None:
            meta[key] = (child.text or "").strip()
    return Envelope(
        to=meta["to"] or "",
        payload=payload,
        id=meta["id"],
        sender=meta["from"],
        thread=meta["thread"],
        parent=meta["parent"],
        sent=meta["sent"],
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
    entry = schema.error_log[0]
    where = readable_path(root, entry.path) or f"{entry.line}:{entry.column}"
    message = entry.message.replace(f"{{{ENVELOPE_NS}}}", "")
    raise EnvelopeError(f"The envelope is not valid: {message} (at {where}).", where=where)


def format_timestamp(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, as written in ``<sent>``: 2026-11-26T05:00:00.123Z."""
    whole = int(seconds)
    millis = int(round((seconds - whole) * 1000))
    if millis == 1000:
        whole, millis = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def serialize_payload(payload: etree._Element) -> bytes:
    """The payload as UTF-8 bytes that keep their namespace when placed inside an envelope.

    Under the envelope's default namespace a no-namespace payload must say ``xmlns=""``;
    lxml leaves it out when such an element is appended to a default-namespace parent, so the
    declaration is written here explicitly.
    """
    data: bytes = etree.tostring(payload, encoding="utf-8", xml_declaration=False, with_tail=False)
    if _namespace(payload.tag) is None:
        end = data.find(b">")
        if data.find(b' xmlns=""', 0, end) < 0:
            cut = 1 + len(_local(payload.tag).encode("utf-8"))
            data = data[:cut] + b' xmlns=""' + data[cut:]
    return data


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
    with ``serialize_payload``."""
    body = payload if isinstance(payload, bytes) else serialize_payload(payload)
    parent_xml = f"<parent>{_escape(parent)}</parent>" if parent else ""
    head = (
        f'<message xmlns="{ENVELOPE_NS}"><meta><id>{_escape(id)}</id>'
        f"<from>{_escape(sender)}</from><to>{_escape(to)}</to>"
        f"<thread>{_escape(thread)}</thread>{parent_xml}<sent>{sent}</sent></meta>"
    )
    return b"".join((head.encode("utf-8"), body, b"</message>"))

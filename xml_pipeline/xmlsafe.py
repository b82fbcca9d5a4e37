"""The one hardened XML parser every piece of outside XML goes through.

Guarantees of ``parse_xml``:

- no DTD of any kind is accepted (so no entity declarations, no billion laughs, no external
  entities): a document with a ``<!DOCTYPE`` raises ``ForbiddenXmlError``, and for UTF-8,
  UTF-16 and UTF-32 input it does so before libxml2 reads the DTD at all;
- entities are never expanded and nothing is ever fetched from the network or the disk
  (XInclude and ``xml-stylesheet`` instructions are left as they are, never processed);
- more than ``limits.max_bytes`` bytes raises ``XmlTooLargeError`` before parsing starts;
- nesting deeper than ``limits.max_depth`` elements raises ``XmlTooDeepError``;
- anything that is not well-formed XML (including empty input, bytes that are not valid in
  the document's encoding and undefined entity references) raises ``MalformedXmlError``
  naming line:column.

Every error is an ``XmlError`` whose ``where`` is ``line:column`` or an XPath when known.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from lxml import etree

from xml_pipeline.errors import (
    ForbiddenXmlError,
    MalformedXmlError,
    XmlTooDeepError,
    XmlTooLargeError,
)

__all__ = ["XmlLimits", "describe_syntax_error", "parse_xml", "readable_path"]

# libxml2's own nesting limit without XML_PARSE_HUGE; our cap must stay below it.
_LIBXML_MAX_DEPTH = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class XmlLimits:
    """Caps applied to every XML document the bus reads.

    Raises ``TypeError`` unless both caps are ints, and ``ValueError`` unless ``max_bytes`` is
    at least 1 and ``max_depth`` is between 1 and 255 (libxml2 refuses deeper documents).
    """

    max_bytes: int = 1_048_576
    max_depth: int = 64

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth"):
            value = getattr(self, name)
            if type(value) is not int:
                raise TypeError(
                    f"XmlLimits.{name} must be a whole number, not {value!r} "
                    f"({type(value).__name__}); pass an int."
                )
        if self.max_bytes < 1:
            raise ValueError(
                f"XmlLimits.max_bytes must be at least 1, not {self.max_bytes}; "
                "the default is 1048576 (1 MiB)."
            )
        if not 1 <= self.max_depth < _LIBXML_MAX_DEPTH:
            raise ValueError(
                f"XmlLimits.max_depth must be between 1 and {_LIBXML_MAX_DEPTH - 1}, not "
                f"{self.max_depth}; the default is 64."
            )


_local = threading.local()
_depth_probes: dict[int, etree.XPath] = {}

# A DOCTYPE can only come in the prolog: after a BOM, the XML declaration, whitespace,
# comments and processing instructions. Possessive quantifiers keep the scan linear.
_PI = r"<\?[^?]*+(?:\?(?!>)[^?]*+)*+\?>"
_COMMENT = r"<!--[^-]*+(?:-(?!->)[^-]*+)*+-->"
_PROLOG_DOCTYPE = re.compile(
    rf"(?:\xef\xbb\xbf)?(?:[ \t\r\n]++|{_PI}|{_COMMENT})*+<!DOCTYPE".encode("latin-1")
)
_PROLOG_DOCTYPE_TEXT = re.compile(rf"\ufeff?(?:[ \t\r\n]++|{_PI}|{_COMMENT})*+<!DOCTYPE")
# How UTF-16 and UTF-32 documents start (with or without a byte order mark).
_WIDE_STARTS = {
    b"\xff\xfe\x00\x00": "utf-32",
    b"\x00\x00\xfe\xff": "utf-32",
    b"<\x00\x00\x00": "utf-32-le",
    b"\x00\x00\x00<": "utf-32-be",
    b"\xff\xfe": "utf-16",
    b"\xfe\xff": "utf-16",
    b"<\x00": "utf-16-le",
    b"\x00<": "utf-16-be",
}
# The encoding pseudo-attribute of an XML declaration at the start of a text string, matched
# one pseudo-attribute at a time (and possessively, so a hostile declaration costs linear time).
_PSEUDO_VALUE = r"[ \t\r\n]*+=[ \t\r\n]*+(?:\"[^\"]*+\"|'[^']*+')"
_TEXT_ENCODING = re.compile(
    rf"\ufeff?<\?xml(?:[ \t\r\n]++(?!encoding[ \t\r\n=])[A-Za-z]++{_PSEUDO_VALUE})*+"
    rf"([ \t\r\n]++encoding{_PSEUDO_VALUE})"
)


def _parser() -> etree.XMLParser:
    # lxml parsers are not thread-safe; keep one per thread.
    parser: etree.XMLParser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = etree.XMLParser(
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            huge_tree=False,
            collect_ids=False,
            remove_blank_text=False,
        )
        _local.parser = parser
    return parser


def _depth_probe(max_depth: int) -> etree.XPath:
    probe = _depth_probes.get(max_depth)
    if probe is None:
        probe = etree.XPath("boolean(/*" + "/*" * max_depth + ")")
        _depth_probes[max_depth] = probe
    return probe


def describe_syntax_error(exc: etree.XMLSyntaxError) -> tuple[str, str | None]:
    """The message and ``line:column`` of an lxml syntax error, without lxml's decorations.

    The message has no trailing period, so callers can end their own sentence."""
    msg = exc.msg or str(exc)
    # lxml appends ", line L, column C" to the message; we report the place separately.
    cut = msg.rfind(", line ")
    if cut > 0:
        msg = msg[:cut]
    msg = " ".join(msg.split()).rstrip(".")
    line, column = exc.position if exc.position else (exc.lineno, None)
    where = f"{line}:{column}" if line is not None and column is not None else None
    return msg, where


def _place(text: str | bytes, offset: int) -> str:
    """``line:column`` (both from 1) of ``offset`` in ``text``."""
    newline = "\n" if isinstance(text, str) else b"\n"
    line = text.count(newline, 0, offset) + 1  # type: ignore[arg-type]
    column = offset - (text.rfind(newline, 0, offset) + 1) + 1  # type: ignore[arg-type]
    return f"{line}:{column}"


def _doctype_where(raw: bytes) -> str | None:
    """``line:column`` of a DOCTYPE in the prolog of ``raw``, or None if there is none."""
    found = _PROLOG_DOCTYPE.match(raw)
    if found is not None:
        return _place(raw, found.end() - len("<!DOCTYPE"))
    if raw[1:2] not in b"\x00\xfe\xff<":  # the second byte of every UTF-16/32 start
        return None
    codec = _WIDE_STARTS.get(raw[:4]) or _WIDE_STARTS.get(raw[:2])
    if codec is None:
        return None
    text = raw.decode(codec, errors="replace")
    found_text = _PROLOG_DOCTYPE_TEXT.match(text)
    if found_text is None:
        return None
    return _place(text, found_text.end() - len("<!DOCTYPE"))


def _forbidden(where: str | None) -> ForbiddenXmlError:
    at = f" (at {where})" if where else ""
    return ForbiddenXmlError(
        f"The document has a DOCTYPE declaration{at}; DTDs and entity declarations are "
        "refused for safety. Remove the <!DOCTYPE ...> and any entity references.",
        where=where,
    )


def _text_to_bytes(text: str) -> bytes:
    """UTF-8 bytes of a text document, whose declared encoding no longer applies."""
    declared = _TEXT_ENCODING.match(text)
    if declared is not None:
        # The text is already decoded; blank out the encoding pseudo-attribute (keeping every
        # column in place) so libxml2 reads the UTF-8 bytes as UTF-8.
        start, end = declared.span(1)
        text = text[:start] + " " * (end - start) + text[end:]
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = _place(text, exc.start)
        raise MalformedXmlError(
            f"The document contains the lone surrogate {text[exc.start]!r} at {where}, which is "
            "not a character; send valid Unicode text.",
            where=where,
        ) from exc


def parse_xml(data: bytes | str, *, limits: XmlLimits = XmlLimits()) -> etree._Element:
    """Parse untrusted XML into its root element, enforcing the guarantees of this module.

    A ``str`` is taken as already-decoded text: an encoding it declares is ignored.
    Raises ``XmlTooLargeError``, ``ForbiddenXmlError``, ``MalformedXmlError`` or
    ``XmlTooDeepError``; never lets an lxml exception through.
    """
    if isinstance(data, str):
        raw = _text_to_bytes(data)
    elif isinstance(data, bytes):
        raw = data
    else:
        raw = bytes(data)
    if len(raw) > limits.max_bytes:
        reached = _place(raw, limits.max_bytes)
        raise XmlTooLargeError(
            f"The document is {len(raw)} bytes, over the limit of {limits.max_bytes} bytes "
            f"(reached at {reached}); send a smaller document or raise limits.max_bytes in "
            "organism.yaml.",
            where=reached,
        )
    if not raw or raw.isspace():
        raise MalformedXmlError("The document is empty; send one XML element.", where="1:1")
    doctype = _doctype_where(raw)
    if doctype is not None:
        raise _forbidden(doctype)
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as exc:
        msg, where = describe_syntax_error(exc)
        at = f" (at {where})" if where else ""
        if msg.startswith("Excessive depth"):
            raise XmlTooDeepError(
                f"The document nests elements more than {_LIBXML_MAX_DEPTH} levels deep{at}, "
                f"over the limit of {limits.max_depth}; flatten it.",
                where=where,
            ) from exc
        hint = ""
        if "encoding" in msg.lower():
            hint = "; send UTF-8, or declare the encoding in <?xml version=\"1.0\" encoding=...?>"
        raise MalformedXmlError(
            f"The document is not well-formed XML: {msg}{at}{hint}.", where=where
        ) from exc
    except ValueError as exc:  # lxml rejects some inputs before parsing
        raise MalformedXmlError(
            f"The document is not well-formed XML: {exc}.", where="1:1"
        ) from exc
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        # Only reached for encodings the prolog scan does not decode (libxml2 has still
        # expanded nothing: entity resolution is off).
        raise _forbidden(None)
    # Each level of nesting costs at least 7 bytes (<a></a>), so small documents need no probe.
    if len(raw) > 7 * limits.max_depth and _depth_probe(limits.max_depth)(root):
        path = _first_too_deep(root, limits.max_depth)
        raise XmlTooDeepError(
            f"The document nests elements deeper than {limits.max_depth} levels (at {path}); "
            "flatten it or raise limits.max_depth in organism.yaml "
            f"(at most {_LIBXML_MAX_DEPTH - 1}).",
            where=path,
        )
    return root


def _first_too_deep(root: etree._Element, max_depth: int) -> str | None:
    return readable_path(root, "/*" + "/*" * max_depth)


def readable_path(element: etree._Element, xpath: str | None = None,
                  namespaces: dict[str, str] | None = None) -> str | None:
    """An XPath of local names (``/message/meta/to``) for ``element``, or for the first match
    of ``xpath`` (as reported by lxml's error log) evaluated on ``element``'s tree with
    ``namespaces`` for its prefixes. Returns ``xpath`` itself if it matches no element."""
    target: object = element
    if xpath is not None:
        try:
            found = element.getroottree().xpath(xpath, namespaces=namespaces)
        except etree.XPathError:
            return xpath
        if not isinstance(found, list) or not found:
            return xpath
        target = found[0]
    if not isinstance(target, etree._Element):
        return xpath
    steps = []
    node: etree._Element | None = target
    while node is not None:
        parent = node.getparent()
        name = etree.QName(node).localname
        if parent is not None:
            same = [c for c in parent if c.tag == node.tag]
            if len(same) > 1:
                name += f"[{same.index(node) + 1}]"
        steps.append(name)
        node = parent
    return "/" + "/".join(reversed(steps))

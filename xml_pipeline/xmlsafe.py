"""The one hardened XML parser every piece of outside XML goes through.

Guarantees of ``parse_xml``:

- no DTD of any kind is accepted (so no entity declarations, no billion laughs, no external
  entities): a document with a ``<!DOCTYPE`` raises ``ForbiddenXmlError``;
- entities are never expanded and nothing is ever fetched from the network or the disk;
- more than ``limits.max_bytes`` bytes raises ``XmlTooLargeError`` before parsing starts;
- nesting deeper than ``limits.max_depth`` elements raises ``XmlTooDeepError``;
- anything that is not well-formed XML raises ``MalformedXmlError`` naming line:column.
"""

from __future__ import annotations

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
    """Caps applied to every XML document the bus reads."""

    max_bytes: int = 1_048_576
    max_depth: int = 64

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, not {self.max_bytes}.")
        if not 1 <= self.max_depth < _LIBXML_MAX_DEPTH:
            raise ValueError(
                f"max_depth must be between 1 and {_LIBXML_MAX_DEPTH - 1}, not {self.max_depth}."
            )


_local = threading.local()
_depth_probes: dict[int, etree.XPath] = {}


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
    """The message and ``line:column`` of an lxml syntax error, without lxml's decorations."""
    msg = exc.msg or str(exc)
    # lxml appends ", line L, column C" to the message; we report the place separately.
    cut = msg.rfind(", line ")
    if cut > 0:
        msg = msg[:cut]
    line, column = exc.position if exc.position else (exc.lineno, None)
    where = f"{line}:{column}" if line is not None and column is not None else None
    return msg, where


def parse_xml(data: bytes | str, *, limits: XmlLimits = XmlLimits()) -> etree._Element:
    """Parse untrusted XML into its root element, enforcing the guarantees of this module."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > limits.max_bytes:
        raise XmlTooLargeError(
            f"The document is {len(raw)} bytes, over the limit of {limits.max_bytes} bytes; "
            "send a smaller document or raise limits.max_bytes in organism.yaml."
        )
    if not raw.strip():
        raise MalformedXmlError("The document is empty; send one XML element.", where="1:1")
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as exc:
        msg, where = describe_syntax_error(exc)
        if "Excessive depth" in msg:
            raise XmlTooDeepError(
                f"The document nests elements deeper than {limits.max_depth} levels "
                f"(at {where}); flatten it.",
                where=where,
            ) from exc
        at = f" at {where}" if where else ""
        raise MalformedXmlError(
            f"The document is not well-formed XML: {msg}{at}.", where=where
        ) from exc
    except ValueError as exc:  # lxml rejects some inputs before parsing (e.g. bad encodings)
        raise MalformedXmlError(f"The document is not well-formed XML: {exc}.") from exc
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise ForbiddenXmlError(
            "The document has a DOCTYPE declaration; DTDs and entity declarations are "
            "refused for safety. Remove the <!DOCTYPE ...> and any entity references.",
            where="1:1",
        )
    # Each level of nesting costs at least 7 bytes (<a></a>), so small documents need no probe.
    if len(raw) > 7 * limits.max_depth and _depth_probe(limits.max_depth)(root):
        raise XmlTooDeepError(
            f"The document nests elements deeper than {limits.max_depth} levels; flatten it "
            "or raise limits.max_depth in organism.yaml.",
            where=_first_too_deep(root, limits.max_depth),
        )
    return root


def _first_too_deep(root: etree._Element, max_depth: int) -> str | None:
    return readable_path(root, "/*" + "/*" * max_depth)


def readable_path(element: etree._Element, xpath: str | None = None) -> str | None:
    """An XPath of local names (``/message/meta/to``) for ``element``, or for the first match
    of ``xpath`` (as reported by lxml's error log) evaluated on ``element``'s tree."""
    target: object = element
    if xpath is not None:
        try:
            found = element.getroottree().xpath(xpath)
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

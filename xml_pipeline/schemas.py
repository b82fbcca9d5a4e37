"""XSD schemas: loaded once, compiled with lxml, used on the hot path.

A payload schema is an XSD file with exactly one global element: that element is the
payload type a listener accepts. Validation uses the compiled ``lxml.etree.XMLSchema``
(a few microseconds); the pure-Python ``xmlschema`` view is built lazily for the jobs where
its features matter and speed does not (dict conversion, describing a schema).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from xml_pipeline.errors import PayloadError, SchemaError
from xml_pipeline.xmlsafe import describe_syntax_error

__all__ = ["PayloadSchema", "load_schema", "qname_text"]

XS = "http://www.w3.org/2001/XMLSchema"


def qname_text(namespace: str | None, local: str) -> str:
    """Clark notation (``{ns}local``) or the bare local name."""
    return f"{{{namespace}}}{local}" if namespace else local


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PayloadSchema:
    """A compiled payload XSD. Immutable; compare schemas by ``digest``."""

    path: Path
    text: str
    digest: str
    namespace: str | None
    root: str  # local name of the one global element
    compiled: etree.XMLSchema = field(repr=False)
    _view: list[Any] = field(default_factory=list, repr=False)

    @property
    def tag(self) -> str:
        """The payload element's tag in Clark notation, as lxml reports it."""
        return qname_text(self.namespace, self.root)

    def validate(self, element: etree._Element) -> None:
        """Raise ``PayloadError`` (naming XPath and line) unless ``element`` is valid."""
        if element.tag != self.tag:
            raise PayloadError(
                f"The payload is <{_pretty(element.tag)}> but {self.path.name} accepts "
                f"<{_pretty(self.tag)}>; send a <{self.root}> element"
                + (f" in namespace {self.namespace!r}." if self.namespace else " with no namespace."),
                where="/" + _pretty(str(element.tag)),
            )
        if self.compiled.validate(element):
            return
        errors = self.compiled.error_log
        first = errors[0] if len(errors) else None
        if first is None:  # pragma: no cover - lxml always logs a reason
            raise PayloadError(f"The payload does not match {self.path.name}.")
        path = first.path or None
        where = path or f"{first.line}:{first.column}"
        raise PayloadError(
            f"The payload does not match {self.path.name}: {first.message} (at {where}).",
            where=where,
        )

    def xmlschema(self) -> Any:
        """The ``xmlschema.XMLSchema`` view of this schema (built on first use)."""
        if not self._view:
            import xmlschema

            self._view.append(xmlschema.XMLSchema(str(self.path)))
        return self._view[0]


def _pretty(tag: object) -> str:
    text = str(tag)
    return text.split("}", 1)[1] if text.startswith("{") else text


def _schema_parser() -> etree.XMLParser:
    # XSDs come from the operator's disk: local includes are fine, the network and DTDs are not.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def load_schema(path: Path) -> PayloadSchema:
    """Read and compile the XSD at ``path``. Raises ``SchemaError`` with file and line."""
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SchemaError(
            f"Cannot read the schema file: {exc.strerror or exc}.", file=name
        ) from exc
    try:
        doc = etree.fromstring(data, _schema_parser(), base_url=str(path.resolve()))
    except etree.XMLSyntaxError as exc:
        msg, where = describe_syntax_error(exc)
        raise SchemaError(f"The schema is not well-formed XML: {msg}.", file=name,
                          line=exc.lineno) from exc
    if doc.tag != f"{{{XS}}}schema":
        raise SchemaError(
            f"The root element is <{_pretty(doc.tag)}>, not <xs:schema>; point 'payload' at an "
            "XSD file.",
            file=name,
            line=doc.sourceline,
        )
    try:
        compiled = etree.XMLSchema(doc)
    except etree.XMLSchemaParseError as exc:
        entry = exc.error_log[0] if len(exc.error_log) else None
        reason = entry.message if entry is not None else str(exc)
        line = entry.line if entry is not None else None
        raise SchemaError(f"The schema does not compile: {reason}.", file=name, line=line) from exc
    elements = [el for el in doc.findall(f"{{{XS}}}element") if el.get("name")]
    if len(elements) != 1:
        names = ", ".join(f"<{el.get('name')}>" for el in elements) or "none"
        raise SchemaError(
            f"A payload schema declares exactly one global element (the payload type); this one "
            f"declares {len(elements)} ({names}). Move the others into complexTypes or local "
            "elements.",
            file=name,
            line=doc.sourceline,
        )
    namespace = doc.get("targetNamespace") or None
    return PayloadSchema(
        path=path,
        text=data.decode("utf-8", errors="replace"),
        digest=hashlib.sha256(data).hexdigest(),
        namespace=namespace,
        root=str(elements[0].get("name")),
        compiled=compiled,
    )

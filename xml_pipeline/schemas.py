"""XSD schemas: loaded once, compiled with lxml, used on the hot path.

A payload schema is an XSD file with exactly one global element: that element is the
payload type a listener accepts. Validation uses the compiled ``lxml.etree.XMLSchema``
(a few microseconds); the pure-Python ``xmlschema`` view is built lazily for the jobs where
its features matter and speed does not (dict conversion, describing a schema).
"""

from __future__ import annotations

import hashlib
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from xml_pipeline.errors import PayloadError, SchemaError
from xml_pipeline.xmlsafe import describe_syntax_error, readable_path

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
        """Return if ``element`` is valid; else raise ``PayloadError`` whose ``where`` is an
        XPath of local names from the payload element (``/Greeting/name``)."""
        if element.tag != self.tag:
            # Name the namespaces only when they are what differs.
            show = _describe if etree.QName(element).namespace != self.namespace else _angled
            raise PayloadError(
                f"The payload is {show(element.tag)} but {self.path.name} accepts "
                f"{show(self.tag)}; send a <{self.root}> element "
                + (f"in namespace {self.namespace!r}." if self.namespace else "with no namespace."),
                where="/" + _pretty(element.tag),
            )
        if self.compiled.validate(element):
            return
        errors = self.compiled.error_log
        first = errors[0] if len(errors) else None
        if first is None:  # pragma: no cover - lxml always logs a reason
            raise PayloadError(f"The payload does not match {self.path.name}.", where="/"
                               + _pretty(element.tag))
        where = _payload_path(element, first.path, first.line) or f"{first.line}:{first.column}"
        message = first.message.strip()
        if not message.endswith("."):
            message += "."
        raise PayloadError(
            f"The payload does not match {self.path.name} at {where}: {message}", where=where
        )

    def example(self) -> str:
        """An example payload (XML text) built from the schema: required content, sample
        values. It is checked against the schema; if it does not fit (unusual facets), the
        bare root element is returned instead."""
        # The common shapes from the XSD's own tree; the xmlschema view (about 11 MiB the
        # process keeps) only for the others, or when the quick one does not fit.
        text = _quick_example(self)
        if text is None or not self.compiled.validate(etree.fromstring(text)):
            text = _example(self)
        if not self.compiled.validate(etree.fromstring(text)):
            return f"<{self.root}/>" if not self.namespace else \
                f'<{self.root} xmlns="{self.namespace}"/>'
        return text

    def xmlschema(self) -> Any:
        """The ``xmlschema.XMLSchema`` view of this schema (built on first use)."""
        if not self._view:
            import xmlschema

            self._view.append(xmlschema.XMLSchema(str(self.path)))
        return self._view[0]


def _pretty(tag: object) -> str:
    text = str(tag)
    return text.split("}", 1)[1] if text.startswith("{") else text


def _angled(tag: object) -> str:
    return f"<{_pretty(tag)}>"


def _describe(tag: object) -> str:
    text = str(tag)
    if text.startswith("{"):
        namespace, local = text[1:].split("}", 1)
        return f"<{local}> in namespace {namespace!r}"
    return f"<{text}> with no namespace"


def _payload_path(element: etree._Element, path: str | None, line: int) -> str | None:
    """The XPath of local names, from the payload element down, of the node that ``path``
    (libxml2's path, relative to ``element`` as the root, with the document's own prefixes)
    names on ``line``; ``path`` itself when it cannot be resolved."""
    if not path:
        return None
    # lxml validated ``element`` as if it were a document root: resolve the path the same way.
    copy = deepcopy(element)
    prefixes = {prefix: uri for node in copy.iter(tag=etree.Element)
                for prefix, uri in node.nsmap.items() if prefix}
    try:
        found = copy.getroottree().xpath(path, namespaces=prefixes)
    except etree.XPathError:
        return path
    if not isinstance(found, list):
        return path
    nodes = [node for node in found if isinstance(node, etree._Element)]
    # libxml2 leaves out the position when siblings of one name use different prefixes.
    on_line = [node for node in nodes if node.sourceline == line]
    target = (on_line or nodes or [None])[0]
    return readable_path(target) if target is not None else path


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
        at = f" (at {where})" if where else ""
        raise SchemaError(
            f"The schema is not well-formed XML: {msg}{at}; point 'payload' at an XSD file.",
            file=name, line=exc.lineno,
        ) from exc
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
        reason = (entry.message if entry is not None else str(exc)).strip().rstrip(".")
        line = entry.line if entry is not None else None
        where = name
        if entry is not None and entry.filename and Path(entry.filename) != path.resolve():
            # The error is in a file this schema includes or imports.
            where = entry.filename
        raise SchemaError(f"The schema does not compile: {reason}.", file=where,
                          line=line) from exc
    elements = [el for el in doc.iterchildren(f"{{{XS}}}element") if el.get("name")]
    if not elements:
        raise SchemaError(
            "A payload schema declares exactly one global element (the payload type); this one "
            "declares none. Add a top-level <xs:element name=...> for the payload.",
            file=name,
            line=doc.sourceline,
        )
    if len(elements) > 1:
        names = ", ".join(f"<{el.get('name')}>" for el in elements)
        raise SchemaError(
            f"A payload schema declares exactly one global element (the payload type); this one "
            f"declares {len(elements)} ({names}). Keep the payload element and move the others "
            "into named complexTypes or local elements.",
            file=name,
            line=elements[1].sourceline,
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


_SAMPLES = {
    "string": "text", "normalizedString": "text", "token": "token", "boolean": "true",
    "decimal": "1.5", "float": "1.5", "double": "1.5", "integer": "1", "int": "1",
    "long": "1", "short": "1", "byte": "1", "nonNegativeInteger": "0",
    "positiveInteger": "1", "negativeInteger": "-1", "nonPositiveInteger": "0",
    "unsignedInt": "1", "unsignedLong": "1", "unsignedShort": "1", "unsignedByte": "1",
    "date": "2026-01-01", "dateTime": "2026-01-01T00:00:00Z", "time": "00:00:00",
    "duration": "PT1S", "anyURI": "https://example.org/", "base64Binary": "AA==",
    "hexBinary": "00", "language": "en", "Name": "name", "NCName": "name", "QName": "name",
    "ID": "id1", "IDREF": "id1", "gYear": "2026",
}


def _sample(simple: Any) -> str:
    """A value that fits a simple type: its first enumeration, else a sample of its base."""
    enumeration = getattr(simple, "enumeration", None)
    if enumeration:
        return str(enumeration[0])
    primitive = getattr(simple, "primitive_type", None)
    name = getattr(primitive, "local_name", None) or getattr(simple, "local_name", None)
    return _fitted(_SAMPLES.get(str(name), "text"), getattr(simple, "min_length", None),
                   getattr(simple, "max_length", None))


def _fitted(value: str, min_length: int | None, max_length: int | None) -> str:
    """``value`` repeated up to ``min_length`` and cut to ``max_length``."""
    if min_length and len(value) < min_length:
        value = value * (min_length // len(value) + 1)
    return value if max_length is None else value[:max_length]


def _fill(element: etree._Element, xsd_element: Any, depth: int) -> None:
    xsd_type = xsd_element.type
    for name, attribute in getattr(xsd_type, "attributes", {}).items():
        if name and getattr(attribute, "use", "optional") == "required":
            element.set(name, _sample(attribute.type))
    if xsd_type.is_simple() or getattr(xsd_type, "has_simple_content", lambda: False)():
        element.text = _sample(xsd_type if xsd_type.is_simple() else xsd_type.content)
        return
    content = getattr(xsd_type, "content", None)
    if content is None or depth > 8:
        return
    for child in content.iter_elements():
        if getattr(child, "min_occurs", 1) == 0 and depth > 0:
            continue
        name = getattr(child, "name", None)
        if not name:
            continue
        node = etree.SubElement(element, name)
        _fill(node, child, depth + 1)


class _Unusual(Exception):
    """A construct the quick example does not handle (the xmlschema view does)."""


def _builtin(qname: str | None, scope: etree._Element) -> str:
    prefix, _, local = (qname or "").rpartition(":")
    if scope.nsmap.get(prefix or None) != XS or local not in _SAMPLES:
        raise _Unusual(qname)
    return _SAMPLES[local]


def _quick_value(simple: etree._Element) -> str:
    restriction = simple.find(f"{{{XS}}}restriction")
    if restriction is None or len(simple) != 1:
        raise _Unusual("simpleType")
    values = restriction.findall(f"{{{XS}}}enumeration")
    if values:
        return str(values[0].get("value"))
    facets = {etree.QName(c).localname: c.get("value", "") for c in restriction
              if isinstance(c.tag, str) and c.tag != f"{{{XS}}}annotation"}
    if set(facets) - {"minLength", "maxLength", "length"}:  # patterns, ranges: xmlschema's
        raise _Unusual("facets")
    exact = facets.get("length")
    low, high = exact or facets.get("minLength"), exact or facets.get("maxLength")
    return _fitted(_builtin(restriction.get("base"), restriction),
                   int(low) if low else None, int(high) if high else None)


def _quick_fill(element: etree._Element, decl: etree._Element, named: dict[str, etree._Element],
                depth: int) -> None:
    if depth > 8 or decl.get("ref") or decl.get("fixed") or decl.get("default"):
        raise _Unusual("element")
    kind = decl.get("type")
    body = named.get(kind.rpartition(":")[2]) if kind else None
    if kind and body is None:
        element.text = _builtin(kind, decl)
        return
    if body is None:
        inline = [c for c in decl if isinstance(c.tag, str) and c.tag != f"{{{XS}}}annotation"]
        body = inline[0] if len(inline) == 1 else None
        if body is None:
            raise _Unusual("no type")
    if body.tag == f"{{{XS}}}simpleType":
        element.text = _quick_value(body)
        return
    for part in _parts(body):
        if etree.QName(part).localname == "attribute":
            if part.get("use") == "required":
                element.set(str(part.get("name")), _builtin(part.get("type"), part))
        else:
            _quick_group(element, part, named, depth)


def _parts(node: etree._Element) -> list[etree._Element]:
    return [c for c in node if isinstance(c.tag, str) and c.tag != f"{{{XS}}}annotation"]


def _quick_group(element: etree._Element, group: etree._Element,
                 named: dict[str, etree._Element], depth: int) -> None:
    """Fill ``element`` with what a sequence, all or choice (its first branch) requires."""
    local = etree.QName(group).localname
    if local not in ("sequence", "all", "choice") or group.get("minOccurs"):
        raise _Unusual(local)
    parts = _parts(group)
    for part in parts[:1] if local == "choice" else parts:
        if etree.QName(part).localname != "element":
            _quick_group(element, part, named, depth)
        elif not part.get("name"):
            raise _Unusual("element")
        elif part.get("minOccurs") != "0" or depth == 0:
            _quick_fill(etree.SubElement(element, str(part.get("name"))), part, named,
                        depth + 1)


def _quick_example(schema: PayloadSchema) -> str | None:
    """An example from the XSD's tree for schemas without a namespace made of sequences,
    choices, required attributes and built-in or enumerated simple types; None for others."""
    if schema.namespace:
        return None
    tree = etree.fromstring(schema.text.encode(), etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False))
    named = {str(t.get("name")): t for t in tree if isinstance(t.tag, str)
             and t.tag in (f"{{{XS}}}complexType", f"{{{XS}}}simpleType")}
    decl = next((e for e in tree if isinstance(e.tag, str) and e.tag == f"{{{XS}}}element"
                 and e.get("name") == schema.root), None)
    if decl is None:
        return None
    root = etree.Element(schema.root)
    try:
        _quick_fill(root, decl, named, 0)
    except _Unusual:
        return None
    return etree.tostring(root, pretty_print=True, encoding="unicode").strip()


def _example(schema: PayloadSchema) -> str:
    view = schema.xmlschema()
    xsd_element = view.elements[schema.root]
    root = etree.Element(schema.tag, nsmap={None: schema.namespace} if schema.namespace else None)
    _fill(root, xsd_element, 0)
    return etree.tostring(root, pretty_print=True, encoding="unicode").strip()

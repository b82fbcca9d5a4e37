"""xml_pipeline.envelope: broken envelopes are refused precisely; envelopes the bus writes
round-trip exactly (build, serialise, parse, validate, compare)."""

from __future__ import annotations

import calendar
import dataclasses
from typing import NamedTuple

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lxml import etree

from xml_pipeline.envelope import (
    ENVELOPE_NS,
    Envelope,
    build_envelope,
    envelope_schema,
    format_timestamp,
    is_valid_id,
    is_valid_name,
    parse_envelope,
    serialize_payload,
)
from xml_pipeline.errors import (
    EnvelopeError,
    ForbiddenXmlError,
    MalformedXmlError,
    XmlError,
    XmlTooDeepError,
    XmlTooLargeError,
)
from xml_pipeline.xmlsafe import XmlLimits

SENT = "2026-11-26T05:00:00.123Z"
ID = "01JDQ0000000000000000000AB"
THREAD = "3f1c9a7e-0b6d-4a51-9f0e-2c4d5e6f7a8b"


def envelope(payload: str = '<Greeting xmlns=""><name>Alice</name></Greeting>', *,
             meta: str = "<to>greeter</to>", before: str = "", between: str = "",
             after: str = "", xmlns: str = f' xmlns="{ENVELOPE_NS}"') -> bytes:
    """A hand-written envelope, as a client might send it."""
    return (f"<message{xmlns}>{before}<meta>{meta}</meta>{between}{payload}{after}"
            "</message>").encode()


def build(payload: etree._Element | bytes, **fields: str) -> bytes:
    values = {"id": ID, "sender": "greeter", "to": "shouter", "thread": THREAD, "sent": SENT}
    values.update(fields)
    return build_envelope(payload=payload, **values)


def c14n(element: etree._Element) -> bytes:
    return etree.tostring(element, method="c14n")


def infoset(node: etree._Element) -> tuple[object, ...]:
    """What a payload means, whatever its prefixes: names with namespaces, attributes, text,
    comments and processing instructions, in order."""
    text, tail = node.text or None, node.tail or None  # lxml reads "" back as None
    if not isinstance(node.tag, str):
        return (type(node).__name__, getattr(node, "target", None), text, tail)
    return (node.tag, sorted(node.attrib.items()), text, tail,
            [infoset(child) for child in node])


def lxml_would_misplace(payload: etree._Element) -> bool:
    """A no-namespace element built under a default namespace: lxml's own serialisation (and
    so its C14N) puts it in that namespace."""
    return any(el.nsmap.get(None) for el in payload.iter("{}*"))


# ---------------------------------------------------------------- refusing broken envelopes


class Case(NamedTuple):
    name: str
    data: bytes
    message: str
    where: str


NO_META = ("The envelope has no <meta> as its first child; put <meta><to>listener</to></meta> "
           "before the payload.")

CORPUS = [
    Case("two payloads", envelope('<A xmlns=""/><B xmlns=""/>'),
         "The envelope has 2 payloads (<A>, <B>); send exactly one payload element per message.",
         "/message/B"),
    Case("two payloads of one name", envelope('<A xmlns=""/><A xmlns=""/><A xmlns=""/>'),
         "The envelope has 3 payloads (<A>, <A>, <A>); send exactly one payload element per "
         "message.", "/message/A[2]"),
    Case("no payload", envelope(""),
         "The envelope has no payload; put exactly one payload element after <meta>.",
         "/message"),
    Case("no payload, only a comment", envelope("<!-- nothing -->"),
         "The envelope has no payload; put exactly one payload element after <meta>.",
         "/message"),
    Case("no meta", f'<message xmlns="{ENVELOPE_NS}"><G xmlns=""/></message>'.encode(),
         NO_META, "/message"),
    Case("meta after the payload",
         f'<message xmlns="{ENVELOPE_NS}"><G xmlns=""/><meta><to>a</to></meta></message>'
         .encode(), NO_META, "/message"),
    Case("empty message", f'<message xmlns="{ENVELOPE_NS}"/>'.encode(), NO_META, "/message"),
    Case("wrong envelope namespace", envelope(xmlns=' xmlns="urn:xml-pipeline:envelope:v2"'),
         "The <message> element is in namespace 'urn:xml-pipeline:envelope:v2'; an envelope "
         "must be in namespace 'urn:xml-pipeline:envelope:v1' (add "
         'xmlns="urn:xml-pipeline:envelope:v1").', "/message"),
    Case("no envelope namespace", envelope("<G/>", xmlns=""),
         "The <message> element is in no namespace; an envelope must be in namespace "
         "'urn:xml-pipeline:envelope:v1' (add xmlns=\"urn:xml-pipeline:envelope:v1\").",
         "/message"),
    Case("a bare payload", b"<Greeting><name>Alice</name></Greeting>",
         "The root element is <Greeting>, not an envelope; wrap the payload in <message "
         'xmlns="urn:xml-pipeline:envelope:v1"><meta><to>listener</to></meta>...</message>.',
         "/Greeting"),
    Case("payload left in the envelope namespace", envelope("<Greeting><name>A</name></Greeting>"),
         "The payload <Greeting> is in the envelope's namespace 'urn:xml-pipeline:envelope:v1', "
         "so no listener schema can match it; write <Greeting xmlns=\"\"> for a payload without a "
         "namespace, or declare its schema's namespace on it.", "/message/Greeting"),
    Case("a second meta as the payload", envelope("<meta><to>a</to></meta>"),
         "The payload <meta> is in the envelope's namespace 'urn:xml-pipeline:envelope:v1', so "
         "no listener schema can match it; write <meta xmlns=\"\"> for a payload without a "
         "namespace, or declare its schema's namespace on it.", "/message/meta[2]"),
    Case("text before meta", envelope(before="Hello bus"),
         "The envelope has the text 'Hello bus' directly inside <message>, where only <meta> and "
         "one payload element may go; move the text into the payload.", "/message"),
    Case("text after the payload",
         envelope(after=" and a long trailing remark that goes on and on "),
         "The envelope has the text 'and a long trailing remark that goes...' directly inside "
         "<message>, where only <meta> and one payload element may go; move the text into the "
         "payload.", "/message"),
    Case("no to", envelope(meta="<from>greeter</from>"),
         "The envelope is not valid at /message/meta: Element 'meta': Missing child element(s). "
         "Expected is ( to ).", "/message/meta"),
    Case("to is not a listener name", envelope(meta="<to>1st listener</to>"),
         "The envelope is not valid at /message/meta/to: Element 'to': [facet 'pattern'] The "
         "value '1st listener' is not accepted by the pattern '[A-Za-z][A-Za-z0-9_.\\-]{0,63}'.",
         "/message/meta/to"),
    Case("sent is not a timestamp", envelope(meta="<to>a</to><sent>yesterday</sent>"),
         "The envelope is not valid at /message/meta/sent: Element 'sent': 'yesterday' is not a "
         "valid value of the atomic type 'xs:dateTime'.", "/message/meta/sent"),
    Case("unknown meta field", envelope(meta="<to>a</to><priority>1</priority>"),
         "The envelope is not valid at /message/meta/priority: Element 'priority': This element "
         "is not expected. Expected is one of ( thread, parent, sent ).",
         "/message/meta/priority"),
    Case("meta fields out of order", envelope(meta="<to>a</to><from>b</from>"),
         "The envelope is not valid at /message/meta/from: Element 'from': This element is not "
         "expected. Expected is one of ( thread, parent, sent ).", "/message/meta/from"),
    Case("attribute on a meta field", envelope(meta='<to priority="high">a</to>'),
         "The envelope is not valid at /message/meta/to: Element 'to', attribute 'priority': "
         "The attribute 'priority' is not allowed.", "/message/meta/to"),
    Case("markup inside a meta field", envelope(meta="<to><b>a</b></to>"),
         "The envelope is not valid at /message/meta/to: Element 'to': Element content is not "
         "allowed, because the type definition is simple.", "/message/meta/to"),
]


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_broken_envelopes(case: Case) -> None:
    with pytest.raises(EnvelopeError) as info:
        parse_envelope(case.data)
    assert info.value.message == case.message
    assert info.value.where == case.where


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b'<!DOCTYPE message [<!ENTITY e "x">]>' + envelope(), ForbiddenXmlError),
        (envelope("<G xmlns=''>" + "<a>" * 70 + "</a>" * 70 + "</G>"), XmlTooDeepError),
        (envelope()[:-3], MalformedXmlError),
        (b"", MalformedXmlError),
        (b"\xff\xfe\x00", MalformedXmlError),
    ],
    ids=["DTD", "too deep", "truncated", "empty", "garbage"],
)
def test_unsafe_or_malformed_xml_keeps_its_own_error(data: bytes, error: type[XmlError]) -> None:
    with pytest.raises(error):
        parse_envelope(data)


def test_limits_are_passed_to_the_parser() -> None:
    data = envelope()
    with pytest.raises(XmlTooLargeError):
        parse_envelope(data, limits=XmlLimits(max_bytes=len(data) - 1))
    with pytest.raises(XmlTooDeepError) as info:
        parse_envelope(data, limits=XmlLimits(max_depth=2))
    assert info.value.where == "/message/meta/to"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_envelopes_never_escape_the_exception_tree(data: st.DataObject) -> None:
    good = build(etree.fromstring('<p:Order xmlns:p="urn:shop" id="7"><item n="2">tea</item>'
                                  "<!-- gift --></p:Order>"), parent=ID)
    start = data.draw(st.integers(0, len(good)))
    end = data.draw(st.integers(start, min(len(good), start + 8)))
    damaged = good[:start] + data.draw(st.binary(max_size=8)) + good[end:]
    try:
        parsed = parse_envelope(damaged)
    except XmlError as exc:
        assert exc.message and exc.code
    else:
        assert isinstance(parsed, Envelope)


# ---------------------------------------------------------------- reading envelopes


def test_parse_reads_every_meta_field() -> None:
    parsed = parse_envelope(envelope(meta=f"<id>{ID}</id><from>greeter</from><to>shouter</to>"
                                          f"<thread>{THREAD}</thread><parent>p.1</parent>"
                                          f"<sent>{SENT}</sent>"))
    assert (parsed.id, parsed.sender, parsed.to, parsed.thread, parsed.parent, parsed.sent) == (
        ID, "greeter", "shouter", THREAD, "p.1", SENT)
    assert parsed.payload_tag == "Greeting"
    assert parsed.payload.findtext("name") == "Alice"


def test_fields_a_client_leaves_out_are_none() -> None:
    parsed = parse_envelope(envelope())
    assert parsed.to == "greeter"
    assert (parsed.id, parsed.sender, parsed.thread, parsed.parent, parsed.sent) == (
        None, None, None, None, None)


def test_comments_and_instructions_around_the_parts_are_ignored() -> None:
    parsed = parse_envelope(envelope(before="<!-- a -->", between="<?note x?>\n",
                                     after="<!-- b -->", meta="<to>gree<!-- split -->ter</to>"))
    assert parsed.to == "greeter"  # the value the XSD checked, not just the first text node
    assert parsed.payload_tag == "Greeting"


def test_envelope_is_frozen() -> None:
    parsed = parse_envelope(envelope())
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.to = "elsewhere"  # type: ignore[misc]


def test_text_input_is_accepted() -> None:
    assert parse_envelope(envelope().decode()).to == "greeter"


# ---------------------------------------------------------------- writing envelopes


def test_build_writes_the_documented_shape() -> None:
    payload = etree.fromstring("<Greeting><name>Alice</name></Greeting>")
    assert build(payload, parent="01JDQ0000000000000000000AA") == (
        b'<message xmlns="urn:xml-pipeline:envelope:v1"><meta><id>01JDQ0000000000000000000AB</id>'
        b"<from>greeter</from><to>shouter</to><thread>3f1c9a7e-0b6d-4a51-9f0e-2c4d5e6f7a8b"
        b"</thread><parent>01JDQ0000000000000000000AA</parent>"
        b"<sent>2026-11-26T05:00:00.123Z</sent></meta>"
        b'<Greeting xmlns=""><name>Alice</name></Greeting></message>')


def test_build_leaves_out_an_absent_parent() -> None:
    data = build(etree.fromstring("<G/>"))
    assert b"<parent>" not in data
    assert parse_envelope(data).parent is None


PAYLOADS = {
    "no namespace": "<Greeting><name>Alice</name></Greeting>",
    "prefixed namespace, unqualified children":
        '<p:Order xmlns:p="urn:shop"><item>tea</item><p:note>hot</p:note></p:Order>',
    "default namespace": '<Order xmlns="urn:shop"><item>tea</item></Order>',
    "default namespace with a no-namespace child":
        '<Order xmlns="urn:shop"><item xmlns="">tea</item></Order>',
    "no namespace with a namespaced child":
        '<Order><x:item xmlns:x="urn:x">tea</x:item><item xmlns="urn:y"/></Order>',
    "non-ASCII text, attributes, comments, instructions":
        '<Grüße lang="de" note="&lt;&amp;&gt;&quot;\'&#10;&#9;"><!-- 🎉 --><name>Zoë 中文 '
        "&amp; &lt;tag&gt;</name><?render fast?><empty/>\r\n</Grüße>",
    "envelope-looking content": "<Quote><message>not an envelope</message><meta/></Quote>",
    "whitespace only text": "<Pad>  <a> </a>\n\t</Pad>",
}


@pytest.mark.parametrize("text", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_envelopes_round_trip_exactly(text: str) -> None:
    payload = etree.fromstring(text.encode())
    data = build(payload, parent="p-1")
    assert envelope_schema().validate(etree.fromstring(data))
    parsed = parse_envelope(data)
    assert (parsed.id, parsed.sender, parsed.to, parsed.thread, parsed.parent, parsed.sent) == (
        ID, "greeter", "shouter", THREAD, "p-1", SENT)
    assert c14n(parsed.payload) == c14n(payload)
    assert infoset(parsed.payload) == infoset(payload)


@pytest.mark.parametrize("text", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_a_payload_read_from_an_envelope_can_be_sent_on_unchanged(text: str) -> None:
    original = etree.fromstring(text.encode())
    first = parse_envelope(build(original)).payload
    second = parse_envelope(build(first, sender="shouter", to="greeter")).payload
    assert c14n(second) == c14n(original)
    assert infoset(second) == infoset(original)


def test_a_payload_inside_another_document_is_written_alone() -> None:
    doc = etree.fromstring('<batch xmlns="urn:batch"><G xmlns="">one</G>tail<H/></batch>')
    parsed = parse_envelope(build(doc[0]))
    assert c14n(parsed.payload) == b"<G>one</G>"


def test_serialize_payload_keeps_the_payload_out_of_the_envelope_namespace() -> None:
    assert serialize_payload(etree.fromstring("<G><n/></G>")) == b'<G xmlns=""><n/></G>'
    assert serialize_payload(etree.fromstring('<p:G xmlns:p="urn:g"><n/></p:G>')) == (
        b'<p:G xmlns="" xmlns:p="urn:g"><n/></p:G>')
    assert serialize_payload(etree.fromstring('<G xmlns="urn:g"><n/></G>')) == (
        b'<G xmlns="urn:g"><n/></G>')


def test_payloads_built_in_memory_keep_their_no_namespace_elements() -> None:
    # lxml writes <item/> here, which a parser puts in urn:shop; the bus must not.
    order = etree.Element("{urn:shop}Order", nsmap={None: "urn:shop", "q": "urn:q"})
    item = etree.SubElement(order, "item", {"{urn:q}code": "7", "n": "2"})
    item.text, item.tail = "tea", "\n"
    etree.SubElement(etree.SubElement(item, "{urn:shop}detail"), "note").text = "hot"
    item.append(etree.Comment(" gift "))
    etree.SubElement(order, "{urn:shop}total").text = "3"
    assert etree.fromstring(etree.tostring(order))[0].tag == "{urn:shop}item"  # lxml's trap
    parsed = parse_envelope(build(order))
    assert infoset(parsed.payload) == infoset(order)
    assert [el.tag for el in parsed.payload.iter(etree.Element)] == [
        "{urn:shop}Order", "item", "{urn:shop}detail", "note", "{urn:shop}total"]


def test_a_payload_built_under_a_default_namespace_parent_is_written_alone() -> None:
    batch = etree.Element("{urn:batch}batch", nsmap={None: "urn:batch"})
    greeting = etree.SubElement(batch, "Greeting")
    etree.SubElement(greeting, "name").text = "Alice"
    data = serialize_payload(greeting)
    assert data == b'<Greeting xmlns=""><name>Alice</name></Greeting>'
    assert parse_envelope(build(data)).payload.find("name") is not None


def test_text_that_looks_like_a_namespace_declaration_is_only_text() -> None:
    payload = etree.fromstring('<Code>&lt;x xmlns="urn:a"&gt;</Code>')
    assert serialize_payload(payload) == b'<Code xmlns="">&lt;x xmlns="urn:a"&gt;</Code>'


def test_a_pre_serialised_payload_gives_the_same_envelope() -> None:
    payload = etree.fromstring('<p:G xmlns:p="urn:g"><n>1</n></p:G>')
    assert build(serialize_payload(payload)) == build(payload)


def test_build_refuses_a_payload_in_the_envelope_namespace() -> None:
    payload = etree.fromstring(f'<Greeting xmlns="{ENVELOPE_NS}"/>')
    with pytest.raises(EnvelopeError) as info:
        build(payload)
    assert info.value.message == (
        "The payload <Greeting> is in the envelope's namespace 'urn:xml-pipeline:envelope:v1', "
        "so no listener schema can match it; write <Greeting xmlns=\"\"> for a payload without "
        "a namespace, or declare its schema's namespace on it.")


NAME_RULE = "a listener name starts with a letter, then up to 63 letters, digits, '_', '.' or '-'"
ID_RULE = "an id is 1 to 128 letters, digits, '_', '.', ':' or '-'"


@pytest.mark.parametrize(
    ("field", "argument", "value", "rule"),
    [
        ("id", "id", "", ID_RULE),
        ("id", "id", "a<b>", ID_RULE),
        ("from", "sender", "9lives", NAME_RULE),
        ("to", "to", "shouter\n", NAME_RULE),
        ("to", "to", "x" * 65, NAME_RULE),
        ("thread", "thread", "my thread", ID_RULE),
        ("thread", "thread", "t" * 129, ID_RULE),
        ("parent", "parent", "</parent><evil/>", ID_RULE),
        ("sent", "sent", "now", "a timestamp is an xs:dateTime such as "
                                 "'2026-11-26T05:00:00.123Z'; make it with "
                                 "format_timestamp(seconds)"),
    ],
)
def test_build_refuses_fields_the_envelope_schema_would_refuse(
        field: str, argument: str, value: str, rule: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        build(etree.fromstring("<G/>"), **{argument: value})
    assert info.value.message == f"The envelope cannot carry {value!r} in <{field}>: {rule}."
    assert info.value.where == f"/message/meta/{field}"


def test_name_and_id_rules_match_the_envelope_schema() -> None:
    assert is_valid_name("greeter") and is_valid_name("a" + "b" * 63)
    assert not is_valid_name("") and not is_valid_name("a" * 65) and not is_valid_name("1a")
    assert is_valid_id(ID) and is_valid_id("a:b.c-d_e")
    assert not is_valid_id("") and not is_valid_id("a b") and not is_valid_id("x" * 129)


# ---------------------------------------------------------------- timestamps


def test_format_timestamp() -> None:
    at = calendar.timegm((2026, 11, 26, 5, 0, 0))
    assert format_timestamp(at + 0.123) == SENT
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert format_timestamp(at + 0.9996) == "2026-11-26T05:00:01.000Z"
    assert format_timestamp(at + 0.0004) == "2026-11-26T05:00:00.000Z"
    assert format_timestamp(-0.5) == "1969-12-31T23:59:59.500Z"


@given(st.floats(min_value=0, max_value=253402300799.0))
def test_timestamps_are_valid_envelope_dates(seconds: float) -> None:
    sent = format_timestamp(seconds)
    parsed = parse_envelope(build(etree.fromstring("<G/>"), sent=sent))
    assert parsed.sent == sent


# ---------------------------------------------------------------- property: exact round trip

NAMES = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_.\-]{0,63}\Z")
IDS = st.from_regex(r"\A[A-Za-z0-9_.:\-]{1,128}\Z")
XML_NAMES = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_.\-]{0,15}\Z").filter(
    lambda name: not name.lower().startswith("xml"))
# Every character XML 1.0 allows.
XML_TEXT = st.text(st.characters(min_codepoint=0x20, exclude_categories=["Cs"],
                                 exclude_characters="\ufffe\uffff")
                   | st.sampled_from("\t\n\r"), max_size=40)
NAMESPACES = st.sampled_from([None, "urn:shop", ENVELOPE_NS + ":payloads", "http://x.test/ns"])


@st.composite
def payloads(draw: st.DrawFn) -> etree._Element:
    namespace = draw(NAMESPACES)
    prefix = draw(st.sampled_from([None, "p", "ns0"])) if namespace else None
    nsmap = {prefix: namespace} if namespace else None
    root = etree.Element(etree.QName(namespace, draw(XML_NAMES)), nsmap=nsmap)
    root.text = draw(XML_TEXT)
    root.set(draw(XML_NAMES), draw(XML_TEXT))
    for _ in range(draw(st.integers(0, 3))):
        child_ns = draw(st.sampled_from([None, namespace]))
        child = etree.SubElement(root, etree.QName(child_ns, draw(XML_NAMES)))
        child.text = draw(XML_TEXT)
        child.tail = draw(XML_TEXT)
    # A comment cannot escape a carriage return: every XML parser reads it back as a newline.
    comment = draw(XML_TEXT).replace("-", "_").replace("\r", " ")
    root.append(etree.Comment(comment))
    return root


@settings(max_examples=200, deadline=None)
@given(id=IDS, sender=NAMES, to=NAMES, thread=IDS, parent=st.none() | IDS,
       seconds=st.floats(min_value=0, max_value=4102444800.0), payload=payloads())
@example(id="0", sender="a", to="b", thread=":", parent=None, seconds=0.0,
         payload=etree.fromstring('<p:x xmlns:p="urn:p"><y/></p:x>'))
def test_any_envelope_the_bus_writes_round_trips(
        id: str, sender: str, to: str, thread: str, parent: str | None, seconds: float,
        payload: etree._Element) -> None:
    sent = format_timestamp(seconds)
    data = build_envelope(id=id, sender=sender, to=to, thread=thread, parent=parent,
                          sent=sent, payload=payload)
    parsed = parse_envelope(data)
    assert (parsed.id, parsed.sender, parsed.to, parsed.thread, parsed.parent, parsed.sent) == (
        id, sender, to, thread, parent, sent)
    assert infoset(parsed.payload) == infoset(payload)
    if not lxml_would_misplace(payload):
        assert c14n(parsed.payload) == c14n(payload)

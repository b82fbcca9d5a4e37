"""xml_pipeline.xmlsafe: the one hardened parser, against a corpus of hostile and broken XML.

Every case must be answered with its own error class, an exact message and a place
(``line:column`` or an XPath in ``exc.where``); nothing may expand, fetch or crash.
"""

from __future__ import annotations

import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from xml_pipeline.errors import (
    ForbiddenXmlError,
    MalformedXmlError,
    XmlError,
    XmlTooDeepError,
    XmlTooLargeError,
)
from xml_pipeline.xmlsafe import XmlLimits, parse_xml, readable_path

FORBIDDEN = (
    "The document has a DOCTYPE declaration (at {where}); DTDs and entity declarations are "
    "refused for safety. Remove the <!DOCTYPE ...> and any entity references."
)
NOT_WELL_FORMED = "The document is not well-formed XML: "


def _billion_laughs(reference: bytes) -> bytes:
    levels = [b'<!ENTITY lol0 "lol">']
    levels += [b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1)) * 10) for i in range(1, 10)]
    return (b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n' + b"\n".join(levels) + b"\n]>\n"
            + reference)


BILLION_LAUGHS = _billion_laughs(b"<lolz>&lol9;</lolz>")
# One 50 kB entity referenced 20,000 times: a gigabyte if expanded, 110 kB on the wire.
QUADRATIC = (b'<!DOCTYPE x [<!ENTITY big "' + b"A" * 50_000 + b'">]><x>'
             + b"&big;" * 20_000 + b"</x>")
UTF16_DTD = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY e "hi">]><x>&e;</x>'


class Case(NamedTuple):
    name: str
    data: bytes | str
    error: type[XmlError]
    message: str  # exact, or for libxml2's own wording a fragment of it (see ``exact``)
    where: str | None
    exact: bool = True


CORPUS = [
    # DTDs of every kind: refused before libxml2 reads them, with the DOCTYPE's place.
    Case("internal entity", b'<!DOCTYPE x [<!ENTITY e "hi">]><x>&e;</x>',
         ForbiddenXmlError, FORBIDDEN.format(where="1:1"), "1:1"),
    Case("external entity file", b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
         b"<x>&e;</x>", ForbiddenXmlError, FORBIDDEN.format(where="1:1"), "1:1"),
    Case("external entity http", b'<!DOCTYPE x [<!ENTITY e SYSTEM "http://127.0.0.1:9/e">]>'
         b"<x>&e;</x>", ForbiddenXmlError, FORBIDDEN.format(where="1:1"), "1:1"),
    Case("external DTD subset", b'<!DOCTYPE x SYSTEM "http://127.0.0.1:9/x.dtd"><x/>',
         ForbiddenXmlError, FORBIDDEN.format(where="1:1"), "1:1"),
    Case("billion laughs", BILLION_LAUGHS, ForbiddenXmlError, FORBIDDEN.format(where="2:1"),
         "2:1"),
    Case("billion laughs in an attribute", _billion_laughs(b'<lolz a="&lol9;"/>'),
         ForbiddenXmlError, FORBIDDEN.format(where="2:1"), "2:1"),
    Case("quadratic blowup", QUADRATIC, ForbiddenXmlError, FORBIDDEN.format(where="1:1"), "1:1"),
    Case("external parameter entity",
         b'<!DOCTYPE x [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><x/>',
         ForbiddenXmlError, FORBIDDEN.format(where="1:1"), "1:1"),
    Case("internal parameter entity",
         b"<!DOCTYPE x [<!ENTITY % p \"<!ENTITY e 'hi'>\"> %p;]><x>&e;</x>",
         ForbiddenXmlError, FORBIDDEN.format(where="1:1"), "1:1"),
    Case("bare doctype", b"<!DOCTYPE x>\n<x/>", ForbiddenXmlError,
         FORBIDDEN.format(where="1:1"), "1:1"),
    Case("doctype after a declaration and a comment",
         b'<?xml version="1.0"?>\n<!-- hi --> <!DOCTYPE x>\n<x/>',
         ForbiddenXmlError, FORBIDDEN.format(where="2:13"), "2:13"),
    Case("doctype with an error after it", b'<!DOCTYPE x [<!ENTITY a "&b;">]><x>&a;</x>',
         ForbiddenXmlError, FORBIDDEN.format(where="1:1"), "1:1"),
    Case("UTF-16 with a DTD", UTF16_DTD.encode("utf-16"), ForbiddenXmlError,
         FORBIDDEN.format(where="1:40"), "1:40"),
    Case("UTF-16BE without a byte order mark, with a DTD", UTF16_DTD.encode("utf-16-be"),
         ForbiddenXmlError, FORBIDDEN.format(where="1:40"), "1:40"),
    Case("UTF-32 with a DTD", UTF16_DTD.replace("16", "32").encode("utf-32"),
         ForbiddenXmlError, FORBIDDEN.format(where="1:40"), "1:40"),
    Case("UTF-16 billion laughs",
         BILLION_LAUGHS.decode().replace('"1.0"?>', '"1.0" encoding="UTF-16"?>').encode("utf-16"),
         ForbiddenXmlError, FORBIDDEN.format(where="2:1"), "2:1"),
    # UTF-7 hides the DOCTYPE from the byte scan; libxml2 decodes it (expanding nothing) and
    # the check after parsing still refuses it, without a place.
    Case("UTF-7 doctype", b'<?xml version="1.0" encoding="UTF-7"?>\n+ADw-!DOCTYPE x+AD4-\n'
         b"+ADw-x/+AD4-", ForbiddenXmlError,
         "The document has a DOCTYPE declaration; DTDs and entity declarations are refused for "
         "safety. Remove the <!DOCTYPE ...> and any entity references.", None),
    # Size and depth.
    Case("oversized", b"<x>" + b"a" * 1_048_574 + b"</x>", XmlTooLargeError,
         "The document is 1048581 bytes, over the limit of 1048576 bytes (reached at 1:1048577); "
         "send a smaller document or raise limits.max_bytes in organism.yaml.", "1:1048577"),
    Case("too deep", b"<a>" * 65 + b"</a>" * 65, XmlTooDeepError,
         "The document nests elements deeper than 64 levels (at " + "/a" * 65 + "); flatten it "
         "or raise limits.max_depth in organism.yaml (at most 255).", "/a" * 65),
    Case("deeper than libxml2 allows", b"<a>" * 300 + b"</a>" * 300, XmlTooDeepError,
         "The document nests elements more than 256 levels deep (at 1:771), over the limit of "
         "64; flatten it.", "1:771"),
    # Not XML, or broken XML: libxml2's own words, our place.
    Case("empty", b"", MalformedXmlError, "The document is empty; send one XML element.", "1:1"),
    Case("only whitespace", b" \r\n\t", MalformedXmlError,
         "The document is empty; send one XML element.", "1:1"),
    Case("not XML at all", b"hello, world", MalformedXmlError, "'<' not found", "1:1",
         exact=False),
    Case("JSON", b'{"to": "greeter"}', MalformedXmlError, "'<' not found", "1:1", exact=False),
    Case("invalid UTF-8", b"<x>caf\xc3</x>", MalformedXmlError, "encoding", "1:7", exact=False),
    Case("latin-1 bytes without a declaration", b"<x>caf\xe9</x>", MalformedXmlError,
         "encoding", "1:7", exact=False),
    Case("undefined entity", b"<x>&nope;</x>", MalformedXmlError, "'nope' not defined", "1:10",
         exact=False),
    Case("mismatched tags", b"<a><b></a>", MalformedXmlError, "mismatch", "1:11", exact=False),
    Case("two roots", b"<a/><b/>", MalformedXmlError, "Extra content", "1:5", exact=False),
    Case("unclosed", b"<a><b>", MalformedXmlError, "", "1:7", exact=False),
    Case("NUL character", b"<x>\x00</x>", MalformedXmlError, "0x0", "1:4", exact=False),
    Case("control character", b"<x>\x01</x>", MalformedXmlError, "Char value 1", "1:4",
         exact=False),
    Case("lone surrogate in a str", "<x>\n a\ud800</x>", MalformedXmlError,
         "The document contains the lone surrogate '\\ud800' at 2:3, which is not a character; "
         "send valid Unicode text.", "2:3"),
]


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_hostile_corpus(case: Case) -> None:
    with pytest.raises(XmlError) as info:
        parse_xml(case.data)
    exc = info.value
    assert type(exc) is case.error
    assert exc.where == case.where
    if case.exact:
        assert exc.message == case.message
    else:
        assert exc.message.startswith(NOT_WELL_FORMED)
        assert case.message in exc.message
        assert exc.message.endswith(f" (at {case.where}).") or (
            case.message == "encoding" and exc.message.endswith(
                f" (at {case.where}); send UTF-8, or declare the encoding in "
                '<?xml version="1.0" encoding=...?>.'))
    assert str(exc) == exc.message


def test_lxml_errors_are_translated_with_their_cause() -> None:
    with pytest.raises(MalformedXmlError) as info:
        parse_xml(b"<a><b></a>")
    assert isinstance(info.value.__cause__, etree.XMLSyntaxError)


def test_external_entities_are_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    for data in (
        f'<!DOCTYPE x [<!ENTITY e SYSTEM "{secret.as_uri()}">]><x>&e;</x>',
        f'<!DOCTYPE x [<!ENTITY % p SYSTEM "{secret.as_uri()}"> %p;]><x/>',
        f'<!DOCTYPE x SYSTEM "{secret.as_uri()}"><x/>',
    ):
        with pytest.raises(ForbiddenXmlError) as info:
            parse_xml(data.encode())
        assert "TOP-SECRET" not in info.value.message


@pytest.mark.parametrize("parse", ["text", "xml"])
def test_xinclude_is_not_processed(tmp_path: Path, parse: str) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_text("<s>TOP-SECRET</s>")
    data = (f'<doc xmlns:xi="http://www.w3.org/2001/XInclude"><xi:include href="{secret.as_uri()}"'
            f' parse="{parse}"/></doc>').encode()
    root = parse_xml(data)
    assert b"TOP-SECRET" not in etree.tostring(root)
    assert [child.tag for child in root] == ["{http://www.w3.org/2001/XInclude}include"]


def test_doctype_text_inside_a_document_is_only_text() -> None:
    root = parse_xml(b"<x><![CDATA[<!DOCTYPE html>]]><!-- <!DOCTYPE y> --></x>")
    assert root.text == "<!DOCTYPE html>"


def test_predefined_and_character_references_still_work() -> None:
    assert parse_xml(b"<x>&lt;&amp;&gt;&quot;&apos;&#233;&#x4E2D;</x>").text == "<&>\"'é中"


def test_size_limit_is_inclusive() -> None:
    data = b"<x>" + b"a" * 93 + b"</x>"
    assert len(data) == 100
    assert parse_xml(data, limits=XmlLimits(max_bytes=100)).tag == "x"
    with pytest.raises(XmlTooLargeError) as info:
        parse_xml(data + b" ", limits=XmlLimits(max_bytes=100))
    assert info.value.message == (
        "The document is 101 bytes, over the limit of 100 bytes (reached at 1:101); send a "
        "smaller document or raise limits.max_bytes in organism.yaml.")


def test_size_is_counted_in_utf8_bytes_for_text() -> None:
    text = "<x>" + "é" * 10 + "</x>"  # 17 characters, 27 bytes
    with pytest.raises(XmlTooLargeError):
        parse_xml(text, limits=XmlLimits(max_bytes=20))


def test_depth_limit_is_inclusive_and_names_the_first_element_too_deep() -> None:
    limits = XmlLimits(max_depth=3)
    assert parse_xml(b"<a><b><c/></b></a>", limits=limits).tag == "a"
    # The shortest document one level too deep: the cheap size test must not skip the probe.
    with pytest.raises(XmlTooDeepError) as info:
        parse_xml(b"<a><b><c><d/></c></b></a>", limits=limits)
    assert info.value.where == "/a/b/c/d"
    assert info.value.message == (
        "The document nests elements deeper than 3 levels (at /a/b/c/d); flatten it or raise "
        "limits.max_depth in organism.yaml (at most 255).")


def test_depth_where_counts_siblings() -> None:
    data = b"<a><b/><b><c><d/></c></b></a>"
    with pytest.raises(XmlTooDeepError) as info:
        parse_xml(data, limits=XmlLimits(max_depth=3))
    assert info.value.where == "/a/b[2]/c/d"


def test_the_deepest_limit_allowed_is_enforced_by_the_bus_not_libxml2() -> None:
    limits = XmlLimits(max_depth=255)
    assert parse_xml(b"<a>" * 255 + b"</a>" * 255, limits=limits).tag == "a"
    with pytest.raises(XmlTooDeepError) as info:
        parse_xml(b"<a>" * 256 + b"</a>" * 256, limits=limits)
    assert info.value.where == "/a" * 256


def test_text_input_ignores_its_declared_encoding() -> None:
    # A str is already decoded: honouring encoding="ISO-8859-1" would turn "é" into "Ã©".
    latin = parse_xml('<?xml version="1.0" encoding="ISO-8859-1"?><x>café</x>')
    assert latin.text == "café"
    wide = parse_xml("<?xml version='1.0' encoding='UTF-16' standalone='yes'?>\n<x>中</x>")
    assert wide.text == "中"


def test_bytes_declaring_their_encoding_are_decoded() -> None:
    data = '<?xml version="1.0" encoding="ISO-8859-1"?><x>café</x>'.encode("latin-1")
    assert parse_xml(data).text == "café"
    assert parse_xml('<x>中</x>'.encode("utf-16")).text == "中"


def test_bytes_like_input_is_accepted() -> None:
    assert parse_xml(bytearray(b"<x/>")).tag == "x"  # type: ignore[arg-type]
    assert parse_xml(memoryview(b"<y/>")).tag == "y"  # type: ignore[arg-type]


def test_one_parser_per_thread() -> None:
    def parse(n: int) -> str:
        return str(parse_xml(f"<n{n}><v>{n}</v></n{n}>".encode()).findtext("v"))

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(parse, range(400))) == [str(n) for n in range(400)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda t: "<x>" + t + "</x>"))
def test_arbitrary_input_never_escapes_the_exception_tree(data: bytes | str) -> None:
    try:
        root = parse_xml(data, limits=XmlLimits(max_bytes=200, max_depth=8))
    except XmlError as exc:
        assert exc.message
        assert exc.where is None or re.fullmatch(r"\d+:\d+|(/[\w.\-]+(\[\d+\])?)+", exc.where)
    else:
        assert isinstance(root, etree._Element)


# ---------------------------------------------------------------- readable_path


def test_readable_path_uses_local_names_and_positions() -> None:
    root = parse_xml(b'<m xmlns="urn:e"><meta/><p:G xmlns:p="urn:g"><n/><n/></p:G></m>')
    second = root[1][1]
    assert readable_path(second) == "/m/G/n[2]"
    assert readable_path(root, "/*/*[2]") == "/m/G"


def test_readable_path_gives_back_an_xpath_it_cannot_resolve() -> None:
    root = parse_xml(b"<m/>")
    assert readable_path(root, "/nothing") == "/nothing"
    assert readable_path(root, "/p:m") == "/p:m"  # unknown prefix


# ---------------------------------------------------------------- XmlLimits


def test_limits_defaults() -> None:
    assert XmlLimits() == XmlLimits(max_bytes=1_048_576, max_depth=64)


def test_limits_are_frozen_and_keyword_only() -> None:
    limits = XmlLimits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_depth = 10  # type: ignore[misc]
    with pytest.raises(TypeError):
        XmlLimits(100, 10)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bytes": 0}, "XmlLimits.max_bytes must be at least 1, not 0; the default is "
                           "1048576 (1 MiB)."),
        ({"max_bytes": -5}, "XmlLimits.max_bytes must be at least 1, not -5; the default is "
                            "1048576 (1 MiB)."),
        ({"max_depth": 0}, "XmlLimits.max_depth must be between 1 and 255, not 0; the default "
                           "is 64."),
        ({"max_depth": 256}, "XmlLimits.max_depth must be between 1 and 255, not 256; the "
                             "default is 64."),
    ],
)
def test_limits_refuse_values_out_of_range(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError) as info:
        XmlLimits(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_bytes": "1000"}, "XmlLimits.max_bytes must be a whole number, not '1000' (str); "
                                "pass an int."),
        ({"max_bytes": 1.5}, "XmlLimits.max_bytes must be a whole number, not 1.5 (float); "
                             "pass an int."),
        ({"max_depth": True}, "XmlLimits.max_depth must be a whole number, not True (bool); "
                              "pass an int."),
        ({"max_depth": None}, "XmlLimits.max_depth must be a whole number, not None "
                              "(NoneType); pass an int."),
    ],
)
def test_limits_refuse_values_that_are_not_ints(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError) as info:
        XmlLimits(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


@pytest.mark.parametrize("depth", [1, 255])
def test_limits_accept_the_ends_of_the_range(depth: int) -> None:
    assert XmlLimits(max_bytes=1, max_depth=depth).max_depth == depth

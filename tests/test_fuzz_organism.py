"""Fuzzing the organism loader: any text gives an ``Organism`` or an ``OrganismError``.

Hypothesis writes organism files three ways: random text and bytes; YAML built from the real
keys and near misses, with values that go wrong in every way a value can (huge numbers, NaN,
booleans where numbers go, bad dates, tags, long strings, deep nesting, duplicate and non-text
keys, anchors and aliases including aliases of a block inside itself, merge keys ``<<``, BOMs
and tabs); and that YAML with characters inserted or deleted. Each must load or raise
``OrganismError`` whose every problem names the file, a line in it (or none, for a problem
with the whole file) and a short sentence. Aliases that stand for billions of values are
refused in bounded time and memory. Handlers import from a folder of fixed modules.

The fuzzers are seeded (``derandomize``) and bounded; the nastiest inputs they found are kept at
the end as plain regression tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GREETING_XSD
from xml_pipeline.config import Organism, load_organism, parse_organism
from xml_pipeline.config.yamlsafe import MAX_NESTING, MAX_PROBLEMS, MAX_VALUES
from xml_pipeline.errors import OrganismError

SETTINGS = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                    max_examples=300,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Handler modules in the organism's folder (names unique to this test module).
MODULES = {
    "fuzz_handlers": "async def greet(payload, ctx):\n    return None\n\n"
                     "def sync(payload, ctx):\n    return None\n",
    "fuzz_broken": "raise RuntimeError('this module does not import')\n",
}
#: The longest message a problem may have: values are shortened, never repeated whole.
MAX_MESSAGE = 1200


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("organism")
    (folder / "schemas").mkdir()
    (folder / "schemas" / "greeting.xsd").write_text(GREETING_XSD)
    (folder / "schemas" / "broken.xsd").write_text("<xs:schema xmlns:xs='nope'>\n<oops")
    for name, text in MODULES.items():
        (folder / f"{name}.py").write_text(text)
    return folder


def check(text: str, folder: Path, *, from_file: bytes | None = None) -> Organism | None:
    """Load ``text`` (or the file holding ``from_file``) and check what comes back."""
    path = folder / "organism.yaml"
    try:
        if from_file is None:
            return parse_organism(text, path=path)
        path = folder / "from_file.yaml"
        path.write_bytes(from_file)
        return load_organism(path)
    except OrganismError as exc:
        assert exc.problems
        lines = len(re.findall(r"\r\n|[\n\r\x85\u2028\u2029]", text)) + 1
        for problem in exc.problems:
            if problem.file != str(path):  # a problem inside a payload schema
                assert problem.line is not None
                continue
            assert problem.file == str(path)
            assert problem.line is None or 1 <= problem.line <= lines, (problem, lines)
            message = problem.message
            assert message and message == message.strip() and message[-1] in ".?", problem
            assert len(message) <= MAX_MESSAGE, problem
        assert len(exc.problems) <= MAX_PROBLEMS + 1
        return None


# ------------------------------------------------------------------ random text and bytes

SPECIALS = ["\ufeff", "\t", "\x00", "\ud800", "\r", "\x85", "\u2028", "%YAML 1.1\n", "---\n",
            "...\n", "&a ", "*a", "<<: ", "!!python/object:os.system ", "? ", "- ", ": ", "{",
            "[", "\"", "'", "#", "|\n", ">\n", "\\"]
any_text = st.lists(st.sampled_from(SPECIALS) | st.text(max_size=20), max_size=20).map("".join)


@SETTINGS
@given(any_text)
def test_random_text_loads_or_is_refused(folder: Path, text: str) -> None:
    check(text, folder)


@settings(SETTINGS, max_examples=100)
@given(st.binary(max_size=200) | any_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_random_bytes_in_a_file_load_or_are_refused(folder: Path, data: bytes) -> None:
    check(data.decode("utf-8", "replace"), folder, from_file=data)


# ------------------------------------------------------------------ YAML built from the keys

SECTIONS = {
    "top": ["organism", "listeners"],
    "organism": ["name", "log", "api", "budgets", "limits"],
    "log": ["path", "url", "fsync", "segment_bytes"],
    "api": ["host", "port"],
    "budgets": ["thread_tokens", "agent_tokens", "organism_tokens"],
    "budget": ["thread_tokens", "agent_tokens"],
    "limits": ["max_bytes", "max_depth"],
    "listener": ["name", "description", "payload", "handler", "agent", "peers", "concurrency",
                 "timeout", "retries", "budget"],
    "agent": ["model", "system", "max_tokens", "temperature", "prices"],
    "prices": ["input", "output"],
    "retries": ["max", "backoff"],
}
NAMES = ["a", "b", "greeter", "shouter", "api", "Bad Name", "x" * 70, "é"]
NUMBERS = ["0", "1", "-1", "3", "1024", "65536", "4096", "9" * 30, "9" * 500, "0x" + "f" * 40,
           "0b101", "0o17", "1:30:00", "1_000", "1.5", "1e400", "-1e400", ".nan", ".inf",
           "-.inf", "1e-400", "true", "false", "yes", "off", "null", "~", "'12'", "12abc"]
DURATIONS = ["30", "30s", "500ms", "2m", "1h", "-5s", "1e999s", "9" * 400, "forever", "0",
             "604801", "1.5", ".nan", "'1h'"]
PER_KEY = {
    "name": NAMES,
    "description": ["d", "''", "'  '", '"\\t"', '"\\ud800"', '"\\U0001F600 ok"', "x" * 3000],
    "payload": ["schemas/greeting.xsd", "schemas/broken.xsd", "schemas/none.xsd", "schemas",
                "/dev/null", "/dev/zero", "/dev/stdin", '"a\\0b"', "x" * 300,
                "../organism/schemas/greeting.xsd"],
    "handler": ["fuzz_handlers:greet", "fuzz_handlers:sync", "fuzz_handlers:gret",
                "fuzz_broken:f", "zz_no_such_module:f", ":f", "m:", ".rel:f", "a b:c",
                "fuzz_handlers:greet:x", "'\\0:f'", "q" * 300 + ":f"],
    "peers": ["[]", "[a, b]", "[greeter, nobody, shouter]", "[1, 2]", "a", "[[a]]", "{a: 1}"],
    "model": ["claude", "''"],
    "system": ["be brief", "''"],
    "temperature": ["0", "0.5", "1", "2", ".nan", "-.inf", "true"],
    "timeout": DURATIONS,
    "backoff": DURATIONS,
    "fsync": ["always", "batch", "never", "alwyas", "[always]", "true"],
    "url": ["nats://localhost:4222", "http://x", "''"],
    "path": ["events", '"a\\0b"', "/tmp/x", "''"],
    "host": ["127.0.0.1", "::1", "''"],
}
ODD_KEYS = ["<<", "1", "true", "null", "~", "[a, b]", "{a: 1}", "'quoted'", '"\\0"',
            "!!python/object:os.system x", "!!int 7", "2020-01-01", "k" * 1100, "名前"]


def near_misses(key: str) -> list[str]:
    return [key[:-1], key + "s", key.upper(), key.replace("_", "-"), key[1:] + key[0]]


def keys_of(section: str) -> st.SearchStrategy[str]:
    real = SECTIONS[section]
    misses = sorted({m for key in real for m in near_misses(key)})
    return (st.sampled_from(real) | st.sampled_from(real) | st.sampled_from(real)
            | st.sampled_from(misses) | st.sampled_from(ODD_KEYS))


KEYS = {section: keys_of(section) for section in SECTIONS}
PERCENT = st.integers(0, 99)


TAGS = ["!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!binary ", "!!timestamp ",
        "!!set ", "!!omap ", "!!seq ", "!!map ", "!!merge ", "!foo ", "!!python/name:os.system ",
        "!!python/object/apply:os.system "]
GENERIC = NUMBERS + NAMES + ["2020-01-01", "2020-13-45", "2020-01-01 25:00:00", "[]", "{}",
                             "''", "|", "-", "@x", "`x", "%x"]


#: Values that pass validation, so that clean documents load and noisy ones fail late.
GOOD = {
    "description": ["d", "says hello"], "payload": ["schemas/greeting.xsd"],
    "handler": ["fuzz_handlers:greet"], "concurrency": ["1", "4"],
    "timeout": ["30s", "500ms", "2", "1.5"], "max": ["0", "3"], "backoff": ["1s", "0.1"],
    "thread_tokens": ["1000"], "agent_tokens": ["5000"], "organism_tokens": ["100000"],
    "max_bytes": ["4096", "1048576"], "max_depth": ["8", "64"], "path": ["events"],
    "fsync": ["always", "batch", "never"], "segment_bytes": ["4096"], "host": ["127.0.0.1"],
    "port": ["0", "8765"], "model": ["claude-x"], "system": ["be brief"],
    "max_tokens": ["100"], "temperature": ["0", "0.5"], "input": ["3", "0.25"],
    "output": ["15"],
}
REQUIRED = {"top": ["organism", "listeners"], "organism": ["name"], "agent": ["model", "system"],
            "listener": ["name", "description", "payload", "handler"]}
BLOCKS = {"organism", "log", "api", "budgets", "limits", "agent", "prices", "retries", "budget"}


class Writer:
    """Writes one YAML document from hypothesis draws, keeping the anchors made so far.

    ``noise`` is the chance (percent) that any one choice goes wrong: at 0 the document is
    a valid organism; above, keys are misspelt or odd, values wrong, tagged, aliased or nested.
    """

    def __init__(self, draw: Any) -> None:
        self.draw = draw
        self.noise = draw(st.sampled_from([0, 0, 2, 5, 15, 40]))
        self.anchors: list[str] = []
        self.listeners = 0

    def maybe(self, chance: int) -> bool:
        # High draws mean "yes": hypothesis favours small numbers and shrinks towards them,
        # so documents start, and shrink, clean.
        return chance > 0 and self.draw(PERCENT) >= 100 - chance

    def odd(self) -> bool:
        return self.maybe(self.noise)

    def anchor(self) -> str:
        if not self.odd():
            return ""
        name = f"a{len(self.anchors)}"
        self.anchors.append(name)
        return f"&{name} "

    def alias(self) -> str | None:
        if self.anchors and self.odd():
            return "*" + self.draw(st.sampled_from(self.anchors))
        return None

    def scalar(self, key: str | None, index: int) -> str:
        if not self.odd():
            if key == "name":
                return f"l{index}"
            if key in GOOD:
                return self.draw(st.sampled_from(GOOD[key]))
        if self.maybe(20):
            text = self.draw(st.text(max_size=12))
            value = json.dumps(text, ensure_ascii=self.maybe(50))
        else:
            choices = PER_KEY.get(key or "", GENERIC)
            value = self.draw(st.sampled_from(choices if self.maybe(75) else GENERIC))
        tag = self.draw(st.sampled_from(TAGS)) if self.maybe(15) else ""
        return self.anchor() + tag + value

    def flow(self, key: str | None, depth: int, index: int = 0) -> str:
        """A value on one line: a scalar, an alias, or a flow mapping or list."""
        alias = self.alias()
        if alias is not None:
            return alias
        if key == "peers" and not self.odd():
            peers = self.draw(st.lists(st.integers(0, max(self.listeners, 1)), max_size=3))
            return "[" + ", ".join(f"l{n}" for n in peers) + "]"
        if depth >= 4 or not self.odd():
            return self.scalar(key, index)
        kind = self.draw(st.integers(0, 9))
        if kind == 0:  # deeper than the loader allows, or just within
            depth_ = self.draw(st.sampled_from([MAX_NESTING - 3, MAX_NESTING + 1, 500]))
            return "[" * depth_ + "]" * depth_
        if kind <= 4:
            return self.scalar(key, index)
        if kind <= 7:
            items = self.draw(st.lists(st.just(0), max_size=4))
            return self.anchor() + "[" + ", ".join(self.flow(key, depth + 1) for _ in items) + "]"
        section = self.draw(st.sampled_from(sorted(SECTIONS)))
        keys = self.draw(st.lists(KEYS[section], max_size=4))
        return self.anchor() + "{" + ", ".join(
            f"{k}: {self.flow(k, depth + 1)}" if k != "<<" else f"<<: {self.merge()}"
            for k in keys) + "}"

    def merge(self) -> str:
        if self.anchors and self.maybe(80):
            picked = self.draw(st.lists(st.sampled_from(self.anchors), min_size=1, max_size=3))
            return "*" + picked[0] if len(picked) == 1 else "[" + ", ".join(
                "*" + name for name in picked) + "]"
        return self.flow(None, 3)

    def keys(self, section: str) -> list[str]:
        optional = [k for k in SECTIONS[section] if k not in REQUIRED.get(section, [])]
        if section == "listener":
            optional.remove("agent")  # a listener has a handler or an agent, not both
        keys = REQUIRED.get(section, []) + (self.draw(st.lists(
            st.sampled_from(optional), unique=True, max_size=4)) if optional else [])
        keys = self.draw(st.permutations(keys)) if self.odd() else keys
        for _ in range(self.draw(st.integers(1, 3)) if self.odd() else 0):
            # misspelt, odd, duplicate and merge keys
            at = self.draw(st.integers(0, len(keys)))
            keys.insert(at, self.draw(KEYS[section] | st.sampled_from(keys or ["<<"])))
        return keys

    def block(self, section: str, indent: str, index: int = 0) -> list[str]:
        """The lines of a block mapping of ``section``'s keys."""
        lines = []
        for key in self.keys(section):
            if key == "<<":
                lines.append(f"{indent}<<: {self.merge()}")
            elif key in BLOCKS and not self.odd():
                lines.append(f"{indent}{key}: {self.anchor()}".rstrip())
                lines.extend(self.block(key, indent + "  "))
            elif key == "listeners" and not self.odd():
                lines.append(f"{indent}listeners:")
                self.listeners = self.draw(st.integers(1, 4))
                for n in range(self.listeners):
                    alias = self.alias()
                    if alias is not None:
                        lines.append(f"{indent}  - {alias}")
                        continue
                    body = self.block("listener", indent + "    ", n)
                    lines.append(f"{indent}  - {self.anchor()}{body[0].lstrip()}")
                    lines.extend(body[1:])
            else:
                lines.append(f"{indent}{key}: {self.flow(key, 1, index)}")
        return lines


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10))


@st.composite
def documents(draw: Any) -> str:
    writer = Writer(draw)
    lines = writer.block("top", "")
    text = "\n".join(lines) + "\n"
    if writer.maybe(writer.noise // 10):  # a billion laughs (each costs a few tenths of a second)
        text = "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + LAUGHS + text
        text = text.replace("description: d", "description: *l9", 1)
    if writer.maybe(writer.noise // 3):
        text = "\ufeff" + text
    if writer.maybe(writer.noise // 3):
        text = text.replace("  ", "\t", 1)
    return text


@settings(SETTINGS, max_examples=600)
@given(documents())
def test_yaml_built_from_the_keys_loads_or_is_refused(folder: Path, text: str) -> None:
    check(text, folder)


@settings(SETTINGS, max_examples=300)
@given(documents(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 3),
                                       st.sampled_from(SPECIALS) | st.text(max_size=3)),
                             min_size=1, max_size=4))
def test_yaml_with_characters_changed_loads_or_is_refused(
        folder: Path, text: str, edits: list[tuple[int, int, str]]) -> None:
    for at, cut, insert in edits:
        at %= len(text) + 1
        text = text[:at] + insert + text[at + cut:]
    check(text, folder)


# ------------------------------------------------------------------ the corpus

VALID = """\
organism: {name: o}
listeners:
  - name: a
    description: d
    payload: schemas/greeting.xsd
    handler: fuzz_handlers:greet
"""


def test_the_fuzzers_can_write_a_valid_organism(folder: Path) -> None:
    organism = check(VALID, folder)
    assert organism is not None and list(organism.listeners) == ["a"]


def _laughs(levels: int, fan_out: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * fan_out)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan_out)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


LISTENER = ("  - &L {name: a, description: d, payload: schemas/greeting.xsd, "
            "handler: fuzz_handlers:greet, peers: [nobody, a, b]}\n")

#: Inputs that once crashed, hung or misreported, with the start of the first problem (or
#: None if the organism loads).
CORPUS: dict[str, tuple[str, int | None, str | None]] = {
    "billion laughs in a value": (
        _laughs(10, 10) + VALID.replace("description: d", "description: *l9"), 1,
        f"The file stands for more than {MAX_VALUES} values once its aliases are written out"),
    "billion laughs in a key": (
        _laughs(10, 10) + "? *l9\n: x\n" + VALID, 1, "The file stands for more than"),
    "billion laughs in a merge": (
        _laughs(10, 10) + "organism:\n  <<: *l9\n  name: o\n", 1,
        "The file stands for more than"),
    "a listener repeated by aliases up to the limit": (
        "organism: {name: o}\nlisteners:\n" + LISTENER + "  - *L\n" * 5000, 3,
        "Listener name 'a' is already used on line 3; names must be unique."),
    "an alias of its own block": ("organism: &a {name: o, x: *a}\n", 1,
                                  "organism.x (line 1) is an alias of a block that contains it"),
    "an alias of its own list": ("listeners: &a [*a]\norganism: {name: o}\n", 1,
                                 "listeners[0] (line 1) is an alias of a block that contains"),
    "a merge of its own block": ("organism: &a {name: o, <<: *a}\nlisteners: []\n", 1,
                                 "organism (line 1) is an alias of a block that contains it"),
    "a merge of a scalar": ("organism: {name: o, <<: x}\nlisteners: []\n", 1,
                            "The merge key '<<' on line 1 takes a mapping"),
    "nesting past the limit": ("organism: " + "[" * 2000 + "]" * 2000 + "\n", 1,
                               f"The block on line 1 is nested more than {MAX_NESTING} levels"),
    "a bad date": ("organism: {name: 2020-13-01}\n", 1,
                   "'2020-13-01' on line 1 cannot be read as !!timestamp (month must be in "
                   "1..12); quote it if it is meant as text."),
    "a bad boolean tag": ("organism: {name: !!bool maybe}\n", 1,
                          "'maybe' on line 1 cannot be read as !!bool (it is not one)"),
    "a bad timestamp tag": ("organism: {name: !!timestamp abc}\n", 1,
                            "'abc' on line 1 cannot be read as !!timestamp (it is not one)"),
    "a bad int tag": ("organism: {name: !!int abc}\n", 1,
                      "'abc' on line 1 cannot be read as !!int (invalid literal"),
    "a 5000-digit number": ("organism:\n  api: {port: " + "9" * 5000 + "}\n", 2,
                            "The number on line 2 is 5000 characters long"),
    "a 5000-digit hexadecimal key": ("organism:\n  ? 0x" + "f" * 5000 + "\n  : 1\n", 2,
                                     "The number on line 2 is 5002 characters long"),
    "a python tag": ("organism: !!python/object:os.system {name: o}\nlisteners: []\n", 1,
                     "The tag '!!python/object:os.system' on line 1 is not allowed"),
    "a python name": ("organism: {name: !!python/name:os.system ''}\n", 1,
                      "The tag '!!python/name:os.system' on line 1 is not allowed"),
    "a set": ("organism: !!set {name, a}\nlisteners: []\n", 1, "The tag '!!set' on line 1"),
    "a NUL character": ("organism: {name: a\x00b}\n", 1,
                        "This is not valid YAML: the character U+0000 on line 1 may not appear"),
    "a lone surrogate on line 3": ("# x\n\norganism: {name: \ud800}\n", 3,
                                   "This is not valid YAML: the character U+D800 on line 3"),
    "an escaped lone surrogate": ('organism: {name: "\\ud800"}\nlisteners: []\n', 1,
                                  "'\\ud800' on line 1 holds a lone surrogate"),
    "a NUL in a payload path": (VALID.replace("schemas/greeting.xsd", '"a\\0b"'), 5,
                                "listeners[0].payload 'a\\x00b' holds a NUL character"),
    "a NaN timeout": (VALID + "    timeout: .nan\n", 7,
                      "listeners[0].timeout must be a duration such as 30s, 500ms or 2m, "
                      "not nan."),
    "a timeout of 400 nines": (VALID + "    timeout: " + "9" * 400 + "\n", 7,
                               "listeners[0].timeout must be a duration such as 30s"),
    "a timeout past a week": (VALID + "    timeout: 8d\n", 7, "listeners[0].timeout must be"),
    "a backoff past a week": (VALID + "    retries: {max: 3, backoff: 1.0e+308}\n", 7,
                              "listeners[0].retries.backoff must be at most 168h, not 1e+308."),
    "an infinite price": (VALID.replace("    handler: fuzz_handlers:greet\n",
                                        "    agent: {model: m, system: s, prices: "
                                        "{input: .inf, output: 1" + "0" * 310 + "}}\n"), 6,
                          "agent.prices.input must be a price in USD per million tokens (a "
                          "number from 0 to 1,000,000), not inf."),
    "a concurrency of a billion": (VALID + "    concurrency: 1000000000\n", 7,
                                   "listeners[0].concurrency must be at most 1024, "
                                   "not 1000000000."),
    "a payload that never ends": (VALID.replace("schemas/greeting.xsd", "/dev/zero"), 5,
                                  "payload '/dev/zero' is not a file but a device or a pipe; "
                                  "point 'payload' at an XSD file."),
    "a relative handler module": (VALID.replace("fuzz_handlers:greet", ".rel:f"), 6,
                                  "handler '.rel:f' must be written 'module:function'"),
    "a long string value": (VALID.replace("name: a", "name: " + "x" * 100_000), 3,
                            "Listener name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxx"),
    "a null key": ("organism: {name: o, ~: 1}\nlisteners: []\n", 1,
                   "Keys must be text, not None; write the key as a plain word."),
    "a list as a key": ("organism:\n  ? [a, b]\n  : 1\n  name: o\nlisteners: []\n", 2,
                        "Keys must be text, not a list (line 2)"),
    "a merge of defaults": (
        "defaults: &d {description: d, payload: schemas/greeting.xsd}\n" + VALID, 1,
        "Unknown key 'defaults' in the top level."),
    "merged listener defaults": (
        "organism: {name: o}\nlisteners:\n  - &d {name: a, description: d, "
        "payload: schemas/greeting.xsd, handler: fuzz_handlers:greet}\n"
        "  - {<<: *d, name: b}\n", None, None),
    "a byte order mark and a tab": ("\ufeff" + VALID.replace("  - name", "\t- name"), 3,
                                    "This is not valid YAML: found character '\\t'"),
    "many problems": ("organism: {name: o}\nlisteners:\n" + LISTENER.replace(
        "peers: [nobody, a, b]", "peers: [" + ", ".join(f"p{i}" for i in range(300)) + "]")
                      + "  - *L\n" * 3, 3, "Listener name 'a' is already used on line 3"),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_corpus(folder: Path, case: str) -> None:
    text, line, start = CORPUS[case]
    organism = check(text, folder)
    if start is None:
        assert organism is not None
        return
    assert organism is None
    with pytest.raises(OrganismError) as caught:
        parse_organism(text, path=folder / "organism.yaml")
    first = caught.value.problems[0]
    assert first.message.startswith(start), first
    assert first.line == line, first


def test_more_problems_than_are_listed_are_counted(folder: Path) -> None:
    with pytest.raises(OrganismError) as caught:
        parse_organism(CORPUS["many problems"][0], path=folder / "organism.yaml")
    problems = caught.value.problems
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1].line is None
    # Three listeners repeat the first one's name, and all four send to 300 unknown peers.
    assert problems[-1].message == (f"{3 + 4 * 300 - MAX_PROBLEMS} more problems are not listed "
                                    f"(only the first {MAX_PROBLEMS} are); fix these, then load "
                                    "the file again to see the rest.")


def test_merged_defaults_are_overridden_by_the_keys_beside_them(folder: Path) -> None:
    organism = check(CORPUS["merged listener defaults"][0], folder)
    assert organism is not None
    assert list(organism.listeners) == ["a", "b"]
    assert organism.listeners["b"].description == "d"


def test_unreadable_files_are_whole_file_problems(folder: Path) -> None:
    path = folder / "latin1.yaml"
    path.write_bytes(b"organism: {name: caf\xe9}\n")
    with pytest.raises(OrganismError) as caught:
        load_organism(path)
    (problem,) = caught.value.problems
    assert problem.line is None and problem.file == str(path)
    assert problem.message.startswith("Cannot read the organism file: 'utf-8' codec can't "
                                      "decode byte 0xe9")

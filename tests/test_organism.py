from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_organism
from xml_pipeline.cli import main
from xml_pipeline.config import load_organism, parse_duration
from xml_pipeline.errors import OrganismError

_counter = itertools.count()

HANDLERS = """
async def greet(payload, ctx):
    return None

def not_async(payload, ctx):
    return None
"""


def _module() -> str:
    # A unique module name per test: handler modules are imported into this process.
    return f"handlers_{next(_counter)}"


def _problems(path: Path) -> list[str]:
    with pytest.raises(OrganismError) as info:
        load_organism(path)
    return [str(p) for p in info.value.problems]


def test_demo_organism_loads() -> None:
    organism = load_organism(ROOT / "organism.yaml")
    assert list(organism.listeners) == ["greeter", "shouter", "announcer"]
    greeter = organism.listeners["greeter"]
    assert greeter.peers == ("shouter",)
    assert greeter.schema.root == "Greeting"
    assert organism.listeners["announcer"].peers == ()
    assert organism.listeners["shouter"].retries.max == 2
    assert organism.listeners["shouter"].retries.backoff == pytest.approx(0.1)
    assert organism.log.path == ROOT / ".xml-pipeline" / "events"


def test_organism_is_frozen(organism_dir: Path) -> None:
    mod = _module()
    path = write_organism(organism_dir, f"""
        organism: {{name: o}}
        listeners:
          - name: a
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
    """, modules={mod: HANDLERS})
    organism = load_organism(path)
    with pytest.raises(AttributeError):
        organism.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        organism.listeners["b"] = organism.listeners["a"]  # type: ignore[index]


def test_retention_and_request_cap(organism_dir: Path) -> None:
    mod = _module()
    listeners = ("listeners:\n  - {name: a, description: d, payload: schemas/greeting.xsd, "
                 f"handler: {mod}:greet}}\n")
    default = load_organism(write_organism(organism_dir, "organism: {name: o}\n" + listeners,
                                           modules={mod: HANDLERS}))
    assert (default.retention.ended_threads, default.retention.idempotency_keys,
            default.api.max_requests) == (10_000, 100_000, 256)
    assert default.log.snapshot_every == 100_000
    path = write_organism(organism_dir, "organism:\n  name: o\n  api: {max_requests: 8}\n"
                          "  log: {snapshot_every: 0}\n"
                          "  retention: {ended_threads: 0, idempotency_keys: 50}\n" + listeners,
                          modules={mod: HANDLERS})
    organism = load_organism(path)
    assert (organism.retention.ended_threads, organism.retention.idempotency_keys,
            organism.api.max_requests, organism.log.snapshot_every) == (0, 50, 8, 0)
    path = write_organism(organism_dir, "organism:\n  name: o\n  api: {max_requests: 0}\n"
                          "  retention: {ended_threads: -1, idempotency_keys: lots, "
                          "forever: true}\n" + listeners, modules={mod: HANDLERS})
    problems = _problems(path)
    file = str(path)
    assert f"{file}:3: organism.api.max_requests must be a whole number of at least 1, " \
           "not 0." in problems
    assert f"{file}:4: organism.retention.ended_threads must be a whole number of at least " \
           "0, not -1." in problems
    assert any("organism.retention.idempotency_keys must be a whole number" in p
               for p in problems)
    assert any("Unknown key 'forever' in organism.retention." in p for p in problems)


def test_missing_peers_means_no_peers(organism_dir: Path) -> None:
    mod = _module()
    path = write_organism(organism_dir, f"""
        organism: {{name: o}}
        listeners:
          - name: a
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
          - name: b
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
            peers: []
    """, modules={mod: HANDLERS})
    organism = load_organism(path)
    assert organism.listeners["a"].peers == ()
    assert organism.listeners["b"].peers == ()


def test_every_problem_is_reported_with_file_and_line(organism_dir: Path) -> None:
    mod = _module()
    path = write_organism(organism_dir, f"""
        organism:
          name: o
          lgo: {{}}
        listeners:
          - name: a
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
            peers: [bee]
            timeout: forever
          - name: bee
            descripton: typo
            payload: schemas/greeting.xsd
            handler: {mod}:not_async
    """, modules={mod: HANDLERS})
    problems = _problems(path)
    file = str(path)
    assert f"{file}:4: Unknown key 'lgo' in organism. Did you mean 'log'? Allowed keys: " \
           "name, log, api, budgets, limits, retention." in problems
    assert f"{file}:11: listeners[0].timeout must be a duration such as 30s, 500ms or 2m, " \
           "not 'forever'." in problems
    assert any(p.startswith(f"{file}:13: Unknown key 'descripton' in listeners[1]. Did you mean "
                            "'description'?") for p in problems)
    assert f"{file}:15: handler '{mod}:not_async' must be an 'async def' function taking " \
           "(payload, ctx)." in problems


def test_unknown_peer_suggests_the_close_name(organism_dir: Path) -> None:
    mod = _module()
    path = write_organism(organism_dir, f"""
        organism: {{name: o}}
        listeners:
          - name: summarizer
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
            peers: [archivst]
          - name: archivist
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
    """, modules={mod: HANDLERS})
    assert _problems(path) == [
        f"{path}:8: Listener 'summarizer' sends to 'archivst', which this organism does not "
        "declare. Did you mean 'archivist'?"
    ]


def test_yaml_syntax_error_names_the_line(organism_dir: Path) -> None:
    path = write_organism(organism_dir, "organism:\n  name: [x\nlisteners: []\n")
    problems = _problems(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:2: This is not valid YAML:")


_NINETEEN = "organism: {name: o}\n" + "# a comment\n" * 17 + "listeners:\n"


@pytest.mark.parametrize(("line", "message"), [
    ("  - {name: a, peers: [x, y\n",
     "This is not valid YAML: the flow sequence '[' opened on line 20 is not closed "
     "(on line 21: expected ',' or ']', but got ':'); close it with ']'."),
    ("  - {name: a, peers: [x, y]\n",
     "This is not valid YAML: the flow mapping '{' opened on line 20 is not closed "
     "(on line 21: expected ',' or '}', but got '<scalar>'); close it with '}'."),
    ("  - {name: 'a, peers: [x]}\n",
     "This is not valid YAML: the quoted scalar opened on line 20 is not closed "
     "(on line 21: found unexpected end of stream); close it with its quote."),
])
def test_an_unclosed_bracket_or_quote_is_reported_where_it_opens(
        organism_dir: Path, line: str, message: str) -> None:
    text = _NINETEEN + line + "other: 1\n"
    assert text.splitlines()[19] == line.rstrip("\n")  # the construct is on line 20
    path = write_organism(organism_dir, text)
    assert _problems(path) == [f"{path}:20: {message}"]


def test_a_yaml_error_at_the_end_of_the_file_names_its_last_line(organism_dir: Path) -> None:
    # PyYAML's mark for the end of a file that ends with a line break is past the last line.
    path = write_organism(organism_dir, "organism: {name: o}\nlisteners:\n  - peers: [x\n")
    assert _problems(path) == [
        f"{path}:3: This is not valid YAML: the flow sequence '[' opened on line 3 is not "
        "closed (on line 3: expected ',' or ']', but got '<stream end>'); close it with ']'."]


def test_bad_xsd_is_reported_in_both_files(organism_dir: Path) -> None:
    mod = _module()
    bad = '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">\n' \
          '  <xs:element name="A" type="Nope"/>\n</xs:schema>\n'
    path = write_organism(organism_dir, f"""
        organism: {{name: o}}
        listeners:
          - name: a
            description: d
            payload: schemas/bad.xsd
            handler: {mod}:greet
    """, schemas={"bad.xsd": bad}, modules={mod: HANDLERS})
    problems = _problems(path)
    assert problems[0].startswith(f"{path}:6: payload 'schemas/bad.xsd': The schema does not "
                                  "compile:")
    assert problems[1].startswith(f"{organism_dir / 'schemas' / 'bad.xsd'}:2: The schema does "
                                  "not compile:")


def test_duplicate_names_and_reserved_names(organism_dir: Path) -> None:
    mod = _module()
    path = write_organism(organism_dir, f"""
        organism: {{name: o}}
        listeners:
          - name: a
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
          - name: a
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
          - name: api
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
    """, modules={mod: HANDLERS})
    problems = _problems(path)
    assert f"{path}:8: Listener name 'a' is already used on line 4; names must be unique." \
        in problems
    assert f"{path}:12: Listener name 'api' is reserved for the bus; choose another." in problems


def test_handler_that_does_not_exist(organism_dir: Path) -> None:
    mod = _module()
    path = write_organism(organism_dir, f"""
        organism: {{name: o}}
        listeners:
          - name: a
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:gret
    """, modules={mod: HANDLERS})
    assert _problems(path) == [
        f"{path}:7: handler '{mod}:gret': module '{mod}' has no 'gret'. Did you mean 'greet'?"
    ]


def test_runs_from_any_working_directory(organism_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _module()
    write_organism(organism_dir, f"""
        organism: {{name: o, log: {{path: data/events}}}}
        listeners:
          - name: a
            description: d
            payload: schemas/greeting.xsd
            handler: {mod}:greet
    """, modules={mod: HANDLERS})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    organism = load_organism(Path("..") / "org" / "organism.yaml")
    assert organism.log.path == organism_dir.resolve() / "data" / "events"
    assert organism.listeners["a"].handler_fn is not None


@pytest.mark.parametrize("text,seconds", [(30, 30.0), ("30s", 30.0), ("500ms", 0.5),
                                          ("2m", 120.0), ("1h", 3600.0), (1.5, 1.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["forever", "-1s", True, "1d"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_check_command(organism_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(ROOT / "organism.yaml")]) == 0
    out = capsys.readouterr().out
    assert "organism 'hello-world'" in out and "greeter" in out and "<Greeting>" in out
    path = write_organism(organism_dir, "organism: {name: o}\nlisteners:\n  - name: a\n")
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: listeners[0].description is required." in err

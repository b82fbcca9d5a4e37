"""The typed budget keys read and write the wire form that events and the API carry."""

from __future__ import annotations

import pytest

from xml_pipeline.state.budget_keys import (
    AgentKey,
    OrganismKey,
    ThreadAgentKey,
    ThreadKey,
    parse_key,
)


@pytest.mark.parametrize(("scope", "key", "budget", "thread_id"), [
    ("thread", "t1", ThreadKey("t1"), "t1"),
    ("thread-agent", "t1|planner", ThreadAgentKey("t1", "planner"), "t1"),
    ("agent", "planner", AgentKey("planner"), None),
    ("organism", "hello", OrganismKey("hello"), None),
])
def test_a_key_parses_from_and_writes_back_its_wire_form(
        scope: str, key: str, budget: object, thread_id: str | None) -> None:
    parsed = parse_key(scope, key)
    assert parsed == budget
    assert parsed is not None and (parsed.scope, parsed.key) == (scope, key)
    assert str(parsed) == f"{scope}:{key}"
    assert parsed.thread_id == thread_id
    assert parsed.covers("t1") and parsed.covers("t2") is (thread_id is None)


def test_a_pair_that_names_no_budget_parses_to_none() -> None:
    assert parse_key("thread-agent", "t1") is None
    assert parse_key("planet", "t1") is None
    assert ThreadAgentKey.parse("t1") is None


def test_there_is_one_organism_budget_whatever_its_name() -> None:
    assert OrganismKey("a") == OrganismKey("b") and len({OrganismKey("a"), OrganismKey("b")}) == 1
    assert ThreadKey("t1|a") != ThreadAgentKey("t1", "a")

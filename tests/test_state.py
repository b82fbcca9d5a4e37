"""State is a pure fold: folding everything equals snapshot + rest, for any event sequence."""

from __future__ import annotations

import dataclasses
import typing

from hypothesis import given, settings
from hypothesis import strategies as st

from xml_pipeline.events import (
    CATALOGUE,
    AgentPaused,
    AgentResumed,
    Event,
    HandlerSucceeded,
    MessageAccepted,
    MessageDeadLettered,
    MessageDelivered,
    ModelResponded,
    OrganismLoaded,
    Recorded,
    ThreadCompleted,
    ThreadKilled,
    TokensReserved,
    TokensUsed,
    decode,
    encode,
)
from xml_pipeline.state import State, project

MESSAGES = st.sampled_from([f"m{i}" for i in range(6)])
THREADS = st.sampled_from([f"t{i}" for i in range(3)])
NAMES = st.sampled_from(["a", "b", "c"])
TIMES = st.floats(min_value=0, max_value=2e9, allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=20)
BUDGETS = st.dictionaries(st.sampled_from(["thread_tokens", "agent_tokens", "organism_tokens"]),
                          st.one_of(st.none(), st.integers(1, 10_000)), max_size=3)
LISTENERS = st.dictionaries(NAMES, st.fixed_dictionaries(
    {}, optional={"budget": st.fixed_dictionaries(
        {}, optional={"agent_tokens": st.integers(1, 5000)})}), max_size=3)

_BY_NAME: dict[str, st.SearchStrategy[typing.Any]] = {
    "at": TIMES,
    "message_id": MESSAGES,
    "parent_id": st.one_of(st.none(), MESSAGES),
    "thread_id": THREADS,
    "reservation_id": st.sampled_from(["r1", "r2", "r3"]),
    "key": st.one_of(THREADS, NAMES, st.sampled_from(["t0|a", "t1|b"])),
    "scope": st.sampled_from(["thread", "thread-agent", "agent", "organism"]),
    "held": st.lists(st.sampled_from(["t0|a", "t1|b", "t2|a"]), max_size=2).map(tuple),
    "listener": NAMES,
    "agent": NAMES,
    "sender": NAMES,
    "to": NAMES,
    "by": NAMES,
    "model": st.sampled_from(["m-small", "m-large"]),
    "idempotency_key": st.one_of(st.none(), st.sampled_from(["k1", "k2"])),
    "budgets": BUDGETS,
    "listeners": LISTENERS,
    "added": st.tuples(NAMES), "removed": st.tuples(), "updated": st.tuples(NAMES),
    "moved": st.tuples(TEXT), "problems": st.tuples(TEXT),
    "changes": st.dictionaries(NAMES, st.lists(st.sampled_from(["payload", "peers"]))),
    "retention": st.dictionaries(st.sampled_from(["ended_threads", "idempotency_keys"]),
                                 st.integers(0, 3)),
    "cost": st.floats(min_value=0, max_value=10, allow_nan=False),
    "latency_ms": st.floats(min_value=0, max_value=1e5, allow_nan=False),
    "duration_ms": st.floats(min_value=0, max_value=1e5, allow_nan=False),
    "delay": st.floats(min_value=0, max_value=100, allow_nan=False),
    "deadline": st.one_of(st.none(), TIMES),
    "holder": NAMES,
    "supersedes": st.one_of(st.none(), st.sampled_from(["l1", "l2"])),
}
LEASES = st.sampled_from(["", "l1", "l2"])  # "": a record from before leases


def _field_strategy(name: str, kind: typing.Any) -> st.SearchStrategy[typing.Any]:
    if name == "lease_id":
        return st.one_of(st.none(), LEASES) if kind == (str | None) else LEASES
    if name in _BY_NAME:
        return _BY_NAME[name]
    if kind is int:
        return st.integers(0, 10_000)
    if kind is bool:
        return st.booleans()
    if kind == (str | None):
        return st.one_of(st.none(), TEXT)
    return TEXT


def _event_strategy(cls: type[Event]) -> st.SearchStrategy[Event]:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: _field_strategy(f.name, hints[f.name])
                             for f in dataclasses.fields(cls)})


# Weighted towards the message lifecycle so that sequences actually interact.
EVENTS = st.one_of(
    *(_event_strategy(c) for c in (MessageAccepted, MessageAccepted, MessageDelivered,
                                   HandlerSucceeded, MessageDeadLettered, ThreadCompleted,
                                   TokensReserved, TokensUsed, OrganismLoaded, AgentPaused,
                                   AgentResumed, ThreadKilled)),
    *(_event_strategy(c) for c in CATALOGUE.values()),
)


def _records(events: list[Event]) -> list[Recorded]:
    return [Recorded(i + 1, e) for i, e in enumerate(events)]


@settings(max_examples=300, deadline=None)
@given(events=st.lists(EVENTS, max_size=60), data=st.data())
def test_fold_all_equals_snapshot_plus_rest(events: list[Event], data: st.DataObject) -> None:
    records = _records(events)
    cut = data.draw(st.integers(0, len(records)))
    whole = project(records)
    snapshot = State.decode(project(records[:cut]).encode())
    resumed = project(records[cut:], snapshot)
    assert resumed == whole
    assert resumed.digest() == whole.digest()


@settings(max_examples=300, deadline=None)
@given(event=st.one_of(*(_event_strategy(c) for c in CATALOGUE.values())))
def test_decode_of_encode_is_the_event(event: Event) -> None:
    assert decode(*encode(event)) == event


@settings(max_examples=100, deadline=None)
@given(events=st.lists(EVENTS, max_size=40))
def test_fold_is_deterministic(events: list[Event]) -> None:
    assert project(_records(events)).digest() == project(_records(events)).digest()


def test_message_lifecycle_and_thread_status() -> None:
    events: list[Event] = [
        OrganismLoaded(at=1, name="o", digest="d", source="", budgets={"thread_tokens": 100},
                       listeners={"a": {}, "b": {}}),
        MessageAccepted(at=2, message_id="m1", thread_id="t1", parent_id=None, sender="api",
                        to="a", payload_type="X", envelope="<x/>"),
        MessageDelivered(at=3, message_id="m1", listener="a", attempt=1),
        MessageAccepted(at=4, message_id="m2", thread_id="t1", parent_id="m1", sender="a",
                        to="b", payload_type="Y", envelope="<y/>"),
        HandlerSucceeded(at=5, message_id="m1", listener="a", duration_ms=1.0),
        MessageDelivered(at=6, message_id="m2", listener="b", attempt=1),
        MessageDeadLettered(at=7, message_id="m2", listener="b", reason="boom"),
        ThreadCompleted(at=8, thread_id="t1"),
        TokensUsed(at=9, thread_id="t1", agent="a", model="m", input_tokens=10,
                   output_tokens=5, cost=0.5),
    ]
    state = project(_records(events))
    thread = state.threads.threads["t1"]
    assert (thread.status, thread.message_count, thread.open_count, thread.dead_count) == \
        ("failed", 2, 0, 1)
    assert state.threads.messages["m2"].parent_id == "m1"
    assert state.threads.dead_letters == {"m2": "boom"}
    assert state.agents.agents["a"].succeeded == 1
    assert state.agents.agents["b"].dead_lettered == 1
    assert state.budgets.threads["t1"].used == 15
    assert state.budgets.threads["t1"].limit == 100
    assert state.budgets.usage_by_model["m"].total_tokens == 15


def _conversation(n: int, *, key: str | None = None, dead: bool = False,
                  kill: bool = False) -> list[Event]:
    """Thread t<n>: one message handled (or dead-lettered), then completed (or killed)."""
    thread, message, at = f"t{n}", f"m{n}", float(n)
    events: list[Event] = [
        MessageAccepted(at=at, message_id=message, thread_id=thread, parent_id=None,
                        sender="api", to="a", payload_type="X", envelope="<x/>",
                        idempotency_key=key),
        MessageDelivered(at=at, message_id=message, listener="a", attempt=1),
    ]
    if kill:
        return [*events, ThreadKilled(at=at, thread_id=thread, by="ops")]
    if dead:
        events.append(MessageDeadLettered(at=at, message_id=message, listener="a", reason="x"))
    else:
        events.append(HandlerSucceeded(at=at, message_id=message, listener="a", duration_ms=1))
    return [*events, ThreadCompleted(at=at, thread_id=thread)]


def _loaded(**retention: int) -> OrganismLoaded:
    return OrganismLoaded(at=0.0, name="o", digest="d", source="", budgets={},
                          listeners={"a": {}}, retention=retention)


def test_only_the_newest_ended_threads_are_kept_and_replay_forgets_the_same() -> None:
    events: list[Event] = [_loaded(ended_threads=5)]
    for n in range(100):
        events += _conversation(n, dead=n == 3, kill=n == 4)
    records = _records(events)
    state = project(records)
    threads = state.threads.threads
    # Bounded: the limit plus the slack that lets trimming happen in batches.
    assert len(threads) <= 5 + 16 + 2
    assert {f"t{n}" for n in range(95, 100)} <= set(threads)
    assert "t50" not in threads and state.threads.forgotten == 100 - len(threads)
    # Killed threads keep refusing messages; a dead letter keeps its thread.
    assert threads["t4"].status == "killed"
    assert threads["t3"].status == "failed" and state.threads.dead_letters == {"m3": "x"}
    # Counts are history, not memory.
    assert state.threads.accepted == 100
    for cut in (0, 37, 150, len(records)):
        resumed = project(records[cut:], State.decode(project(records[:cut]).encode()))
        assert resumed == state, cut


def test_a_thread_that_goes_on_after_ending_is_not_forgotten_by_its_first_end() -> None:
    again = MessageAccepted(at=1.5, message_id="again", thread_id="t0", parent_id=None,
                            sender="api", to="a", payload_type="X", envelope="<x/>")
    events: list[Event] = [_loaded(ended_threads=1), *_conversation(0), again]
    for n in range(1, 40):
        events += _conversation(n)
    middle = project(_records(events)).threads
    # t0's first end is long gone from the newest, but t0 went on: it is active, and kept.
    assert middle.threads["t0"].status == "active" and "t1" not in middle.threads
    events += [HandlerSucceeded(at=41.0, message_id="again", listener="a", duration_ms=1),
               ThreadCompleted(at=41.0, thread_id="t0")]
    threads = project(_records(events)).threads.threads
    assert (threads["t0"].status, threads["t0"].message_count) == ("completed", 2)


def test_the_budgets_of_forgotten_threads_are_forgotten_but_totals_keep_their_tokens(
        ) -> None:
    events: list[Event] = [_loaded(ended_threads=2)]
    for n in range(60):
        thread, message = f"t{n}", f"m{n}"
        agent_turn: list[Event] = [
            TokensReserved(at=float(n), reservation_id=f"r{n}", thread_id=thread, agent="a",
                           model="m", tokens=10),
            ModelResponded(at=float(n), key=f"{message}#0", message_id=message,
                           thread_id=thread, agent="a", model="m", text="<x/>"),
            TokensUsed(at=float(n), reservation_id=f"r{n}", thread_id=thread, agent="a",
                       model="m", input_tokens=3, output_tokens=2, cost=0.0),
        ]
        conversation = _conversation(n)
        events += [*conversation[:2], *agent_turn, *conversation[2:]]
    records = _records(events)
    state = project(records)
    budgets = state.budgets
    kept = set(state.threads.threads)
    assert len(kept) <= 2 + 16 and "t59" in kept
    assert set(budgets.threads) == kept and set(budgets.usage_by_thread) == kept
    assert {key.partition("|")[0] for key in budgets.thread_agents} == kept
    assert {key.partition("#")[0] for key in budgets.responses} == {
        f"m{t[1:]}" for t in kept}
    assert set(budgets.thread_responses) == kept
    # The agent's, the model's and the organism's totals still count every token.
    assert budgets.agents["a"].used == budgets.organism.used == 60 * 5
    assert budgets.usage_by_model["m"].total_tokens == 60 * 5
    assert not state.threads.just_forgotten
    for cut in (0, 100, 333, len(records)):
        resumed = project(records[cut:], State.decode(project(records[:cut]).encode()))
        assert resumed == state, cut


def test_only_the_newest_idempotency_keys_are_remembered() -> None:
    events: list[Event] = [_loaded(idempotency_keys=10)]
    for n in range(200):
        events += _conversation(n, key=f"key-{n}")
    records = _records(events)
    state = project(records)
    keys = state.threads.idempotency
    # Which keys go is part of the state: a snapshot anywhere changes nothing.
    for cut in (100, 333, 577):
        resumed = project(records[cut:], State.decode(project(records[:cut]).encode()))
        assert list(resumed.threads.idempotency) == list(keys)
    assert len(keys) <= 10 + 16
    assert keys["key-199"] == ("m199", "t199")
    assert all(f"key-{n}" in keys for n in range(190, 200))
    assert "key-100" not in keys


def test_without_retention_in_the_log_the_defaults_apply() -> None:
    events: list[Event] = [OrganismLoaded(at=0, name="o", digest="d", source="", budgets={},
                                          listeners={"a": {}})]
    for n in range(50):
        events += _conversation(n, key=f"k{n}")
    state = project(_records(events))
    assert len(state.threads.threads) == 50 and len(state.threads.idempotency) == 50
    assert (state.threads.keep_ended, state.threads.keep_keys) == (10_000, 100_000)


def test_unknown_event_type_fails_loudly() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Invented(Event):
        pass

    state = State()
    try:
        state.apply(1, Invented(at=1.0))
    except TypeError as exc:
        assert "Invented is not in the event catalogue" in str(exc)
    else:
        raise AssertionError("an unknown event type was folded silently")


def test_a_call_held_by_a_budget_waits_until_a_raise_frees_it_and_replay_agrees() -> None:
    from xml_pipeline.events import BudgetExhausted, BudgetRaised
    from xml_pipeline.state.budget_keys import ThreadAgentKey
    from xml_pipeline.state.budgets import blocking, raised, waiting

    loaded = OrganismLoaded(at=0.0, name="o", digest="d", source="",
                            budgets={"thread_tokens": 10_000},
                            listeners={"a": {"budget": {"thread_tokens": 300}}})
    events: list[Event] = [
        loaded,
        MessageAccepted(at=1.0, message_id="m1", thread_id="t1", parent_id=None, sender="api",
                        to="a", payload_type="X", envelope="<x/>"),
        BudgetExhausted(at=2.0, scope="thread-agent", key="t1|a", thread_id="t1", agent="a",
                        limit=300, used=0, requested=1200),
    ]
    state = project(_records(events))
    assert state.threads.threads["t1"].status == "paused"
    (blocker,) = waiting(state.budgets, "t1", organism="o")
    assert (blocker.scope, blocker.key, blocker.gauge.limit, blocker.needed) == (
        "thread-agent", "t1|a", 300, 1200)
    # Raising the thread's budget does not free the call: the decision says it is still held.
    thread_raise = raised(state.budgets, scope="thread", key="t1", max_tokens=50_000, at=3.0,
                          by="ops", organism="o")
    assert thread_raise.held == ("t1|a",)
    events.append(thread_raise)
    state = project(_records(events))
    assert state.threads.threads["t1"].status == "paused"
    assert state.budgets.threads["t1"].limit == 50_000 and "t1" in state.budgets.holds
    # Raising the agent's budget in the thread frees it.
    pair_raise = raised(state.budgets, scope="thread-agent", key="t1|a", max_tokens=2000,
                        at=4.0, by="ops", organism="o")
    assert pair_raise.held == ()
    assert blocking(state.budgets, "t1", "a", 1200, organism="o",
                    assuming=(ThreadAgentKey("t1", "a"), 2000)) is None
    events.append(pair_raise)
    state = project(_records(events))
    assert state.threads.threads["t1"].status == "active" and state.budgets.holds == {}
    # A record from before ``held`` existed frees what it covers, as it did then.
    legacy = [*events[:3], BudgetRaised(at=3.0, scope="thread", key="t1", max_tokens=9, by="x")]
    assert project(_records(legacy)).threads.threads["t1"].status == "active"
    assert project(_records(legacy)).budgets.holds == {}
    # Snapshot anywhere + the rest equals the whole fold.
    records = _records(events)
    for cut in range(len(records) + 1):
        resumed = project(records[cut:], State.decode(project(records[:cut]).encode()))
        assert resumed.digest() == state.digest()

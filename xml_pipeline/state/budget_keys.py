"""The names of token budgets: one typed key per scope, and their wire form.

A budget is named on the wire, in events and in the API by ``(scope, key)``:

=================  ==========================  ===================
scope              key                         type
=================  ==========================  ===================
``thread``         ``<thread id>``             ``ThreadKey``
``thread-agent``   ``<thread id>|<agent>``     ``ThreadAgentKey``
``agent``          ``<agent>``                 ``AgentKey``
``organism``       ``<organism name>``         ``OrganismKey``
=================  ==========================  ===================

``parse_key(scope, key)`` reads that form and ``budget.scope``/``budget.key`` write it;
``str(budget)`` is ``"<scope>:<key>"``, the form of the warnings map. ``BudgetRaised.held``
names waiting calls as ``"<thread id>|<agent>"``: a ``ThreadAgentKey``'s ``key``. Thread ids
and names cannot hold ``|`` (the envelope schema's patterns), so the forms are unambiguous.
There is one organism budget: two ``OrganismKey`` are equal whatever name they carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeAlias

__all__ = ["SCOPES", "AgentKey", "BudgetKey", "OrganismKey", "ThreadAgentKey", "ThreadKey",
           "parse_key"]

#: The budgets a call counts against, in the order they are checked (and listed).
SCOPES = ("thread", "thread-agent", "agent", "organism")


class _Key:
    __slots__ = ()
    scope: ClassVar[str]

    @property
    def key(self) -> str:
        """The key that names the budget within its scope (the wire and event form)."""
        raise NotImplementedError

    if TYPE_CHECKING:  # a field of the thread keys, a property of the others
        @property
        def thread_id(self) -> str | None:
            """The one thread whose calls the budget counts, or None for every thread."""

    def covers(self, thread_id: str) -> bool:
        """Whether the budget counts the calls of ``thread_id`` (a raise may free them)."""
        return self.thread_id is None or self.thread_id == thread_id

    def __str__(self) -> str:
        return f"{self.scope}:{self.key}"


@dataclass(frozen=True, slots=True)
class ThreadKey(_Key):
    """A thread's budget (the whole conversation)."""

    scope: ClassVar[str] = "thread"
    thread_id: str

    @property
    def key(self) -> str:
        return self.thread_id


@dataclass(frozen=True, slots=True)
class ThreadAgentKey(_Key):
    """One agent's budget within one thread (its ``budget.thread_tokens``)."""

    scope: ClassVar[str] = "thread-agent"
    thread_id: str
    agent: str

    @property
    def key(self) -> str:
        return f"{self.thread_id}|{self.agent}"

    @classmethod
    def parse(cls, key: str) -> ThreadAgentKey | None:
        """The key ``"<thread id>|<agent>"`` names, or None if it has no ``|``."""
        thread_id, bar, agent = key.partition("|")
        return cls(thread_id, agent) if bar else None


@dataclass(frozen=True, slots=True)
class AgentKey(_Key):
    """An agent's budget across all threads."""

    scope: ClassVar[str] = "agent"
    agent: str

    @property
    def thread_id(self) -> None:
        return None

    @property
    def key(self) -> str:
        return self.agent


@dataclass(frozen=True, slots=True)
class OrganismKey(_Key):
    """The organism's budget (all agents, all threads)."""

    scope: ClassVar[str] = "organism"
    name: str = field(compare=False)

    @property
    def thread_id(self) -> None:
        return None

    @property
    def key(self) -> str:
        return self.name


BudgetKey: TypeAlias = ThreadKey | ThreadAgentKey | AgentKey | OrganismKey


def parse_key(scope: str, key: str) -> BudgetKey | None:
    """The budget ``(scope, key)`` names, or None if it names none (an unknown scope, a
    thread-agent key without ``|``)."""
    if scope == "thread":
        return ThreadKey(key)
    if scope == "thread-agent":
        return ThreadAgentKey.parse(key)
    if scope == "agent":
        return AgentKey(key)
    if scope == "organism":
        return OrganismKey(key)
    return None

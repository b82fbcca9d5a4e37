"""organism.yaml's frozen model: the ``Organism`` and its parts, built only by the loader.

Every value here is immutable (frozen, slotted dataclasses; the listeners are a read-only
mapping), so the running bus cannot change its configuration: a reload builds a new
``Organism`` and swaps it whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xml_pipeline.schemas import PayloadSchema
from xml_pipeline.xmlsafe import XmlLimits

__all__ = [
    "AgentConfig",
    "ApiConfig",
    "Budget",
    "FSYNC_POLICIES",
    "Listener",
    "LogConfig",
    "Organism",
    "RESERVED_SENDERS",
    "Retention",
    "RetryPolicy",
]

#: Senders the bus uses for messages that no listener sent; no listener may take these names.
RESERVED_SENDERS = frozenset({"api", "cli", "system"})
FSYNC_POLICIES = ("always", "batch", "never")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max: int = 0  # retries after the first attempt
    backoff: float = 1.0  # seconds before the first retry; doubles each time


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """Token limits; ``None`` means no limit at that scope."""

    thread_tokens: int | None = None
    agent_tokens: int | None = None
    organism_tokens: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    model: str
    system: str
    max_tokens: int = 1024
    temperature: float | None = None
    #: USD per million tokens, overriding the built-in price table for this agent
    price_input: float | None = None
    price_output: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    path: Path | None = None
    url: str | None = None
    fsync: str = "batch"
    segment_bytes: int = 64 * 1024 * 1024
    #: records between snapshots of the state while running (0: only on a graceful stop)
    snapshot_every: int = 100_000


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    #: HTTP requests handled at once (event streams aside); more are answered 503 at once
    max_requests: int = 256
    #: seconds a request body may take to arrive; a slower one is answered 408
    body_timeout: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """How much finished work the state keeps in memory (the log keeps everything)."""

    #: ended threads kept, newest first; older ones are answered from the log only
    ended_threads: int = 10_000
    #: idempotency keys remembered, newest first
    idempotency_keys: int = 100_000

    def summary(self) -> dict[str, int]:
        return {"ended_threads": self.ended_threads, "idempotency_keys": self.idempotency_keys}


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Listener:
    name: str
    description: str
    schema: PayloadSchema
    peers: tuple[str, ...]
    handler: str | None = None  # "module:function"
    handler_fn: Callable[..., Any] | None = field(default=None, repr=False)
    agent: AgentConfig | None = None
    concurrency: int = 1
    timeout: float = 30.0
    retries: RetryPolicy = RetryPolicy()
    budget: Budget = Budget()
    line: int | None = None

    def summary(self) -> dict[str, Any]:
        """The listener's configuration as plain data (recorded in the log, shown by the API)."""
        return {
            "name": self.name,
            "description": self.description,
            "payload": str(self.schema.path),
            "payload_type": self.schema.root,
            "payload_namespace": self.schema.namespace,
            "schema_digest": self.schema.digest,
            "handler": self.handler,
            "agent": None
            if self.agent is None
            else {
                "model": self.agent.model,
                "system": self.agent.system,
                "max_tokens": self.agent.max_tokens,
                "temperature": self.agent.temperature,
                "prices": {"input": self.agent.price_input, "output": self.agent.price_output},
            },
            "peers": list(self.peers),
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "retries": {"max": self.retries.max, "backoff": self.retries.backoff},
            "budget": {
                "thread_tokens": self.budget.thread_tokens,
                "agent_tokens": self.budget.agent_tokens,
            },
        }


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Organism:
    name: str
    path: Path
    root: Path
    source: str
    digest: str
    log: LogConfig
    api: ApiConfig
    budgets: Budget
    limits: XmlLimits
    retention: Retention
    listeners: Mapping[str, Listener]

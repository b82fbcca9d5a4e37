"""The one exception tree of xml-pipeline.

Every error the package raises on purpose derives from ``XmlPipelineError``.
Messages are sentences that name the value, where it was found and how to fix it.
Errors from lxml, PyYAML and the operating system are translated at one boundary
with ``raise ... from exc``.

    XmlPipelineError
    ├── XmlError                        input XML that the bus will not take
    │   ├── XmlTooLargeError            more bytes than the configured cap
    │   ├── XmlTooDeepError             deeper nesting than the configured cap
    │   ├── MalformedXmlError           not well-formed XML (line:column)
    │   ├── ForbiddenXmlError           DTDs and entity declarations
    │   ├── EnvelopeError               well-formed, but not a valid envelope
    │   └── PayloadError                the payload does not match its schema (XPath)
    ├── SchemaError                     an XSD that does not load or compile (file:line)
    ├── OrganismError                   organism.yaml problems (file:line, all of them)
    ├── RoutingError                    where a message may not go
    │   ├── UnknownListenerError
    │   ├── UndeclaredPeerError
    │   └── ThreadClosedError           the thread was killed
    ├── BusyError                       try again later (backpressure, stopping)
    │   └── MailboxFullError
    ├── BudgetExhaustedError            an LLM call would exceed a token budget
    ├── LeaseLostError                  a holder's lease expired, was revoked or superseded
    ├── AgentError                      an LLM agent could not produce a valid answer
    └── LogError                        the event log
        ├── LogLockedError              another process is writing to this log
        ├── LogCorruptedError           checksum or hash chain broken (names the position)
        │   └── LogDamagedError         found on open: the log is refused before any append
        ├── LogWriteError               an append could not be made durable
        ├── LogClosedError              the log was used after close()
        └── RecordDecodeError           unknown record type or version, undecodable data
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AgentError",
    "BudgetExhaustedError",
    "BusyError",
    "EnvelopeError",
    "ForbiddenXmlError",
    "LeaseLostError",
    "LogClosedError",
    "LogCorruptedError",
    "LogDamagedError",
    "LogError",
    "LogLockedError",
    "LogWriteError",
    "MailboxFullError",
    "MalformedXmlError",
    "OrganismError",
    "PayloadError",
    "Problem",
    "RecordDecodeError",
    "RoutingError",
    "SchemaError",
    "ThreadClosedError",
    "UndeclaredPeerError",
    "UnknownListenerError",
    "XmlError",
    "XmlPipelineError",
    "XmlTooDeepError",
    "XmlTooLargeError",
]


class XmlPipelineError(Exception):
    """Base class of every error raised by xml-pipeline on purpose."""

    #: A short, stable, machine-readable code (used in logs and API error bodies).
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class XmlError(XmlPipelineError):
    """Input XML that the bus refuses. ``where`` is ``line:column`` or an XPath when known."""

    code = "invalid_xml"

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


class XmlTooLargeError(XmlError):
    code = "xml_too_large"


class XmlTooDeepError(XmlError):
    code = "xml_too_deep"


class MalformedXmlError(XmlError):
    code = "malformed_xml"


class ForbiddenXmlError(XmlError):
    code = "forbidden_xml"


class EnvelopeError(XmlError):
    code = "invalid_envelope"


class PayloadError(XmlError):
    code = "invalid_payload"


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One problem found in a configuration file, with its place."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        place = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{place}: {self.message}"


class SchemaError(XmlPipelineError):
    """An XSD that cannot be read or compiled."""

    code = "invalid_schema"

    def __init__(self, message: str, *, file: str, line: int | None = None) -> None:
        super().__init__(message)
        self.problem = Problem(file=file, line=line, message=message)

    def __str__(self) -> str:
        return str(self.problem)


class OrganismError(XmlPipelineError):
    """organism.yaml is not valid. ``problems`` lists every problem found, each with file:line."""

    code = "invalid_organism"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the organism:"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class RoutingError(XmlPipelineError):
    code = "routing_error"


class UnknownListenerError(RoutingError):
    code = "unknown_listener"


class UndeclaredPeerError(RoutingError):
    code = "undeclared_peer"


class ThreadClosedError(RoutingError):
    code = "thread_closed"


class BusyError(XmlPipelineError):
    """The bus cannot take this now; ``retry_after`` says when to try again (seconds)."""

    code = "busy"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class MailboxFullError(BusyError):
    code = "mailbox_full"


class BudgetExhaustedError(XmlPipelineError):
    """The call was not made: it would exceed the ``scope`` budget (``key``)."""

    code = "budget_exhausted"

    def __init__(self, message: str, *, scope: str, key: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.key = key


class LeaseLostError(XmlPipelineError):
    """The holder of a delivery no longer holds its lease: it expired (the handler timed
    out), was revoked (its thread was killed) or was superseded (another holder was given the
    message). Whatever the holder sends or reports with it changes nothing."""

    code = "lease_lost"


class AgentError(XmlPipelineError):
    code = "agent_error"


class LogError(XmlPipelineError):
    code = "log_error"


class LogLockedError(LogError):
    code = "log_locked"


class LogCorruptedError(LogError):
    """The log is damaged. ``position`` is the first record that fails its check."""

    code = "log_corrupted"

    def __init__(self, message: str, *, position: int) -> None:
        super().__init__(message)
        self.position = position


class LogDamagedError(LogCorruptedError):
    """Opening found the log damaged (a damaged or missing record, a segment out of place, a
    history that a snapshot contradicts), so it was refused and left as it was. ``segment``
    and ``offset`` say where, when a place in a file is known."""

    code = "log_damaged"

    def __init__(self, message: str, *, position: int, segment: str | None = None,
                 offset: int | None = None) -> None:
        super().__init__(message, position=position)
        self.segment = segment
        self.offset = offset


class LogWriteError(LogError):
    code = "log_write_failed"


class LogClosedError(LogError):
    code = "log_closed"


class RecordDecodeError(LogError):
    code = "record_undecodable"

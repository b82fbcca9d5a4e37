"""The mapper: events to stored records and back.

The stored form is not the event: ``encode`` turns an event into ``(type, version, data)`` and
``decode`` turns that back, running upcasters for old versions. An unknown type or version is
a ``RecordDecodeError``, never a silent skip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeAlias

import msgspec

from xml_pipeline.errors import RecordDecodeError
from xml_pipeline.events.catalogue import CATALOGUE, Event

__all__ = ["UPCASTERS", "VERSIONS", "Recorded", "decode", "encode", "event_fields"]

#: Version 2 of the delivery and outcome events carries leases (``lease_id`` and the rest).
VERSIONS: dict[str, int] = {
    **dict.fromkeys(CATALOGUE, 1),
    **dict.fromkeys(("MessageDelivered", "HandlerSucceeded", "HandlerFailed",
                     "MessageRetried", "MessageDeadLettered"), 2),
}

Upcaster: TypeAlias = Callable[[dict[str, Any]], dict[str, Any]]


def _before_leases(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had no leases: its deliveries and outcomes read as the empty lease (granted
    and folded as they were), its retries and dead letters as the bus's own decisions."""
    return data


#: ``(type, version) -> function`` turning that version's data into the next version's.
UPCASTERS: dict[tuple[str, int], Upcaster] = {
    (name, 1): _before_leases
    for name in ("MessageDelivered", "HandlerSucceeded", "HandlerFailed", "MessageRetried",
                 "MessageDeadLettered")
}

_encoder = msgspec.json.Encoder()
_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(cls) for name, cls in CATALOGUE.items()
}
_TYPE_BYTES: dict[type[Event], tuple[bytes, int]] = {
    cls: (name.encode("ascii"), VERSIONS[name]) for name, cls in CATALOGUE.items()
}


@dataclass(frozen=True, slots=True)
class Recorded:
    """An event with the position the log gave it."""

    position: int
    event: Event


#: The float fields of each event: JSON has no NaN or infinity (msgspec writes them as null),
#: so a record holding one could never be read back.
_FLOATS: dict[type[Event], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls) if f.type in ("float", "float | None"))
    for cls in CATALOGUE.values()
}


def encode(event: Event) -> tuple[bytes, int, bytes]:
    """``(type, version, data)`` of an event; ``data`` is JSON that ``decode`` turns back into
    an equal event. Raises ``TypeError`` for an event outside the catalogue and ``ValueError``
    for one that could not be read back (a NaN or infinite number, text with a lone
    surrogate), so that no such record is ever written."""
    cls = type(event)
    try:
        name, version = _TYPE_BYTES[cls]
    except KeyError:
        raise TypeError(f"{cls.__name__} is not in the event catalogue.") from None
    for key in _FLOATS[cls]:
        value = getattr(event, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{cls.__name__}.{key} is {value!r}, which JSON cannot hold; "
                             "the code that made this event must give a finite number.")
    try:
        return name, version, _encoder.encode(event)
    except UnicodeEncodeError as exc:
        raise ValueError(f"{cls.__name__} holds text with a lone surrogate "
                         f"({exc.object[exc.start:exc.end]!r}), which cannot be stored; the "
                         "code that made this event must escape or replace it.") from exc


def decode(type_name: bytes | str, version: int, data: bytes) -> Event:
    """The event stored as ``(type, version, data)``. Raises ``RecordDecodeError`` (and nothing
    else) for an unknown type or version and for data that is not the event's JSON."""
    name = type_name.decode("ascii", "replace") if isinstance(type_name, bytes) else type_name
    current = VERSIONS.get(name)
    if current is None:
        raise RecordDecodeError(
            f"Unknown event type {name!r}; this version of xml-pipeline does not know it "
            "(upgrade xml-pipeline to read this log)."
        )
    damaged = ("; the log was written by another build of xml-pipeline or damaged, so run "
               "'xml-pipeline replay --verify'.")
    if version < 1:
        raise RecordDecodeError(f"{name} version {version} cannot be (versions start at 1)"
                                f"{damaged}")
    if version > current:
        raise RecordDecodeError(
            f"{name} version {version} is not known (this build reads versions 1 to "
            f"{current}); upgrade xml-pipeline to read this log."
        )
    try:
        if version == current:
            return _decoders[name].decode(data)
        raw = msgspec.json.decode(data)
        for step in range(version, current):
            upcaster = UPCASTERS.get((name, step))
            if upcaster is None:
                raise RecordDecodeError(
                    f"No upcaster turns {name} version {step} into version {step + 1}; "
                    "this build cannot read the record, so use the build that wrote it."
                )
            raw = upcaster(raw)
        return msgspec.convert(raw, CATALOGUE[name])
    except msgspec.ValidationError as exc:
        raise RecordDecodeError(f"The {name} data does not fit the event ({exc})"
                                f"{damaged}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # invalid UTF-8 in a string
        raise RecordDecodeError(f"The {name} data is not JSON ({exc}){damaged}") from exc
    except RecursionError as exc:  # msgspec's guard against deep nesting in ``Any`` fields
        raise RecordDecodeError(f"The {name} data is nested too deeply to decode"
                                f"{damaged}") from exc


def event_fields(cls: type[Event]) -> tuple[str, ...]:
    """The field names of an event type (for docs and the API)."""
    return tuple(f.name for f in fields(cls))

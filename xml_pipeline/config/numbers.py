"""Numbers read from organism.yaml: durations (``30s``, ``500ms``, ``2m``) and finite floats."""

from __future__ import annotations

import math
import re
from typing import Any

from xml_pipeline.config.yamlsafe import YamlDocument, show, where

__all__ = ["MAX_DURATION", "duration", "finite", "parse_duration"]

#: The longest timeout or retry backoff: beyond it, doubling backoffs soon overflow a float.
MAX_DURATION = 7 * 24 * 3600.0

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``30``, ``1.5``, ``"500ms"``, ``"30s"``, ``"2m"`` or ``"1h"``. Raises
    ``ValueError`` for anything else, including negative, infinite and NaN durations."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int | float):
        seconds = finite(value)
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if not match:
            raise ValueError(value)
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds is None or not seconds >= 0 or math.isinf(seconds):
        raise ValueError(value)
    return seconds


def finite(value: int | float) -> float | None:
    """``value`` as a float, or None if it is not a finite number (NaN, infinity, a huge int)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def duration(doc: YamlDocument, value: Any, path: tuple[Any, ...], default: float, *,
             positive: bool = False) -> float:
    """The seconds ``value`` at ``path`` stands for (``default`` if it is None), or
    ``default`` with a problem added to ``doc`` if it is no duration up to ``MAX_DURATION``."""
    if value is None:
        return default
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = -1.0
    if seconds < 0 or (positive and seconds == 0):
        doc.problem(path, f"{where(path)} must be a duration{' over 0' if positive else ''} "
                          f"such as 30s, 500ms or 2m, not {show(value)}.")
        return default
    if seconds > MAX_DURATION:
        doc.problem(path, f"{where(path)} must be at most {MAX_DURATION / 3600:g}h, "
                          f"not {show(value)}.")
        return default
    return seconds

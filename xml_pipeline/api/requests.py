"""What the endpoints read from a request, checked: the pump it acts on, who acts, paging and
whole-number query parameters, and a JSON body.

Each reader raises ``ApiError`` (400) with a sentence that names the parameter or the place in
the body, the value and what is allowed.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import msgspec
from starlette.requests import HTTPConnection, Request

from xml_pipeline.api.responses import ApiError
from xml_pipeline.runtime.pump import Pump

__all__ = ["caller", "integer", "page", "parse_json", "pump_of"]


def pump_of(conn: HTTPConnection) -> Pump:
    """The running pump the request acts on (the application's)."""
    pump: Pump = conn.app.state.pump
    return pump


def caller(request: Request) -> str:
    """Who did it, for the log: the client's own label if it sent a sane one."""
    label = request.headers.get("x-client-name", "api")
    return label if label.replace("-", "").replace("_", "").isalnum() and len(label) <= 64 \
        else "api"


def _int(conn: HTTPConnection, name: str, default: int, low: int, high: int) -> int:
    raw = conn.query_params.get(name)
    if raw is None:
        return default
    try:
        # ASCII digits only: int() would also take " 5", "5_0" and "\u0665".
        value = int(raw) if raw.isascii() and raw.isdigit() else low - 1
    except ValueError:  # more digits than int() converts
        value = low - 1
    if not low <= value <= high:
        raise ApiError("invalid_request",
                       f"The query parameter {name!r} must be a whole number from {low} to "
                       f"{high}, not {raw!r}.", details={"parameter": name})
    return value


def page(conn: HTTPConnection, *, default_limit: int = 50, max_limit: int = 1000
         ) -> tuple[int, int]:
    """``(limit, offset)`` from the query string, checked."""
    return (_int(conn, "limit", default_limit, 1, max_limit),
            _int(conn, "offset", 0, 0, 1 << 62))


def integer(conn: HTTPConnection, name: str, default: int) -> int:
    return _int(conn, name, default, 0, 1 << 62)


def parse_json(raw: bytes) -> Any:
    """The JSON document in ``raw``; raises ``ApiError("invalid_json")`` saying what is wrong
    and where. Its strings are Unicode text: a lone surrogate escape (``"\\ud800"``) is refused
    here, since the log could not store it nor a response carry it."""
    try:
        # msgspec first (a tenth of json's time): it takes no lone surrogate, NaN, BOM, other
        # encoding or huge number, so what it takes json would take the same. What it refuses
        # goes to json, for json's answer and its message.
        return _fast_decode(raw)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError("invalid_json",
                       f"The body is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                       f"{exc.colno}; send one JSON object with 'to' and 'payload'.",
                       details={"line": exc.lineno, "column": exc.colno}) from exc
    except UnicodeDecodeError as exc:
        raise ApiError("invalid_json",
                       f"The body is not valid JSON: byte {exc.object[exc.start]:#04x} at "
                       f"offset {exc.start} is not {exc.encoding}; send the JSON in UTF-8.",
                       details={"offset": exc.start}) from exc
    except RecursionError as exc:
        raise ApiError("invalid_json",
                       "The body is not valid JSON: its arrays or objects nest too deeply to "
                       "parse; send a flatter document.") from exc
    except ValueError as exc:  # a number with more digits than int() converts
        raise ApiError("invalid_json",
                       f"The body has a number of more than {sys.get_int_max_str_digits()} "
                       "digits; send it as a string.") from exc
    where = _lone_surrogate(data)
    if where is not None:
        raise ApiError("invalid_json",
                       f"The JSON body has a lone surrogate (an escape from \\ud800 to \\udfff "
                       f"without its pair) in {where}; send valid Unicode text.",
                       details={"field": where})
    return data


_fast_decode = msgspec.json.Decoder().decode

_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(data: Any) -> str | None:
    """Where a string or key holding a lone surrogate is in ``data`` (``'payload.n[0]'``, ``the
    key 'payload.x'``, ``the body``), or None. Iterative: the document may nest deeply."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        place, value = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            return f"'{place}'" if place else "the body"
        if isinstance(value, dict):
            for key, item in value.items():
                name = key.encode("utf-8", "backslashreplace").decode("utf-8")
                inner = f"{place}.{name}" if place else name
                if _SURROGATE.search(key):
                    return f"the key '{inner}'"
                stack.append((inner, item))
        elif isinstance(value, list):
            stack.extend((f"{place}[{index}]", item) for index, item in enumerate(value))
    return None

"""The local control channel of a running organism (until the HTTP API takes over).

``xml-pipeline run`` listens on a Unix socket derived from its log directory (so that
``xml-pipeline inject --data DIR`` finds it), readable only by the user who started it.
One JSON object per line each way: ``{"op": "inject", "to", "payload", "thread_id"?,
"idempotency_key"?}``, ``{"op": "status"}`` (waits until idle, then returns the state digest).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from xml_pipeline.errors import BusyError, XmlPipelineError
from xml_pipeline.pump import Pump

__all__ = ["control_path", "request", "serve_control"]

_MAX_LINE = 2 * 1024 * 1024


def control_path(data: Path) -> Path:
    """A short socket path (Unix sockets are limited to ~100 bytes) unique to a log directory."""
    key = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"xml-pipeline-{key}.sock"


async def _answer(pump: Pump, request: dict[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    if op == "inject":
        accepted = await pump.inject(request.get("payload", ""), to=request.get("to"),
                                     thread_id=request.get("thread_id"), sender="cli",
                                     idempotency_key=request.get("idempotency_key"))
        return {"ok": True, "message_id": accepted.message_id, "thread_id": accepted.thread_id}
    if op == "status":
        await pump.wait_idle()
        return {"ok": True, "position": pump.state.position, "digest": pump.state.digest()}
    return {"ok": False, "error": {"code": "unknown_op", "message": f"Unknown op {op!r}."}}


@asynccontextmanager
async def serve_control(pump: Pump, data: Path) -> AsyncIterator[Path]:
    path = control_path(data)
    with suppress(FileNotFoundError):
        path.unlink()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    answer = await _answer(pump, json.loads(line))
                except BusyError as exc:
                    answer = {"ok": False, "error": {"code": exc.code, "message": exc.message,
                                                     "retry_after": exc.retry_after}}
                except XmlPipelineError as exc:
                    answer = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
                except (ValueError, TypeError) as exc:
                    answer = {"ok": False, "error": {"code": "bad_request",
                                                     "message": f"Bad request: {exc}."}}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(handle, path=str(path), limit=_MAX_LINE)
    finally:
        os.umask(old)
    try:
        yield path
    finally:
        server.close()
        with suppress(FileNotFoundError):
            path.unlink()


async def request(data: Path, message: dict[str, Any]) -> dict[str, Any]:
    """Send one request to the organism running on log ``data``; its answer."""
    path = control_path(data)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=_MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ConnectionError(
            f"No organism is running on the log at {data} (no control socket at {path}); "
            "start it with 'xml-pipeline run'.") from exc
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
    finally:
        writer.close()
    if not line:
        raise ConnectionError("The organism closed the connection without answering.")
    answer: dict[str, Any] = json.loads(line)
    return answer

"""A local stub of the Anthropic Messages API, served by a real uvicorn on a free port.

Scripted answers are served in order; every request body is kept for the test to check. An
answer may be held (``hold=True``) until the test releases it.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@dataclass
class Answer:
    text: str = ""
    input_tokens: int = 10
    output_tokens: int = 5
    status: int = 200
    hold: bool = False


@dataclass
class Stub:
    answers: list[Answer] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def script(self, *answers: Answer) -> None:
        self.answers.extend(answers)

    async def messages(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        if not self.answers:
            return JSONResponse({"type": "error", "error": {
                "type": "invalid_request_error", "message": "the stub has no answer left"}},
                status_code=400)
        answer = self.answers.pop(0)
        if answer.hold:
            self.held.set()
            await self.release.wait()
        if answer.status != 200:
            kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(
                answer.status, "invalid_request_error")
            return JSONResponse({"type": "error", "error": {"type": kind,
                                                            "message": answer.text}},
                                status_code=answer.status, headers={"retry-after-ms": "5"})
        return JSONResponse({
            "id": f"msg_{len(self.requests)}", "type": "message", "role": "assistant",
            "model": body["model"], "content": [{"type": "text", "text": answer.text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        })


@asynccontextmanager
async def messages_stub() -> AsyncIterator[Stub]:
    stub = Stub()
    app = Starlette(routes=[Route("/v1/messages", stub.messages, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    stub.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        yield stub
    finally:
        stub.release.set()
        server.should_exit = True
        await task
        sock.close()


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)

"""The guards that need no I/O, in one middleware: the request id, the token, the origin."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xml_pipeline.api.auth import LocalOnlyCheck, TokenCheck

__all__ = ["GuardMiddleware"]

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")


class GuardMiddleware:
    """The guards that need no I/O, in one layer (each layer costs every request a coroutine
    resumed at every step): an ``X-Request-ID`` on every answer (the client's, if sane), then
    the token (``TokenCheck``), then, without a token, the origin (``LocalOnlyCheck``)."""

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self.checks = (TokenCheck(token), LocalOnlyCheck(token))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given and _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        for check in self.checks:
            refusal = check.refusal(scope)
            if refusal is not None:
                await refusal.send(scope, send_with_id)
                return
        await self.app(scope, receive, send_with_id)

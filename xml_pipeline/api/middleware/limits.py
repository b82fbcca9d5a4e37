"""One request's passage through the guard: its slot, its body's time and size, its answer.

An ``Exchange`` is what the guard (``guard.Guard``) hands the application as ``receive`` and
``send``, in place of the server's: one wrapper for every rule, instead of one per rule.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import Message, Receive, Send

__all__ = ["BodyTimeoutError", "BusyError", "Counter", "Exchange", "TooLargeError",
           "declared_over"]

_CLOSE = (b"connection", b"close")
#: how long, and how much, of a body is still read after an early answer before the close
_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 16 * 1024 * 1024


def declared_over(length: bytes | None, limit: int) -> bool:
    """Whether a Content-Length header is over ``limit`` (or not a number): refused with 413
    on the header, without reading the body."""
    return length is not None and (not length.isdigit() or int(length) > limit)


class BusyError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BodyTimeoutError(Exception):
    pass


class TooLargeError(Exception):
    pass


class Counter:
    """The slots of one server: requests being handled, and bodies still arriving."""

    __slots__ = ("handling", "receiving")

    def __init__(self) -> None:
        self.handling = 0
        self.receiving = 0


def busy_message(handling: bool, limit: int) -> str:
    what = f"handling {limit} requests" if handling else f"receiving {limit} request bodies"
    return (f"The server is {what} already (organism.api.max_requests); retry after "
            "Retry-After seconds.")


class Exchange:
    """``receive`` and ``send`` for one request, with the guard's rules applied.

    - ``send`` adds ``X-Request-ID`` to the answer. Once ``close_after`` is set (an answer
      given before the request body was read to the end), it also closes the connection,
      after reading (and dropping) what still comes of the body until that time or
      ``_DRAIN_BYTES``: closing a socket with unread data in it resets the connection, and a
      client still sending would lose the answer.
    - With ``cap`` set, a body over ``cap`` bytes raises ``TooLargeError`` from ``receive``.
    - With ``deadline`` set (``track``), the body must arrive by then (``BodyTimeoutError``),
      and the request holds a slot of ``counter``: a receiving one while its body is still
      arriving, a handling one once it is complete; a slot that is full raises
      ``BusyError``. An answer before the body is complete gives the slot back.
    """

    __slots__ = ("_receive", "_send", "_header", "counter", "limit", "cap", "seen",
                 "deadline", "slot", "complete", "started", "first", "close_after")

    def __init__(self, receive: Receive, send: Send, header: tuple[bytes, bytes]) -> None:
        self._receive = receive
        self._send = send
        self._header = header
        self.counter: Counter | None = None
        self.limit = 0
        self.cap: int | None = None
        self.seen = 0
        self.deadline: float | None = None
        self.slot: bool | None = None  # True: handling, False: receiving, None: none
        self.complete = True
        self.started = False
        self.first: Message | None = None
        self.close_after: float | None = None

    def closing(self, seconds: float) -> None:
        """Close the connection after the answer, draining the body for ``seconds`` at most."""
        self.close_after = asyncio.get_running_loop().time() + seconds

    # ------------------------------------------------------------ slots and body time

    def track(self, counter: Counter, limit: int, deadline: float) -> None:
        self.counter, self.limit, self.deadline = counter, limit, deadline
        self.complete = False

    def _take(self, handling: bool) -> None:
        if self.slot is handling:
            return
        counter = self.counter
        assert counter is not None
        if (counter.handling if handling else counter.receiving) >= self.limit:
            raise BusyError(busy_message(handling, self.limit))
        self.release()
        if handling:
            counter.handling += 1
        else:
            counter.receiving += 1
        self.slot = handling

    def release(self) -> None:
        counter = self.counter
        if counter is not None and self.slot is not None:
            if self.slot:
                counter.handling -= 1
            else:
                counter.receiving -= 1
        self.slot = None

    async def next_part(self) -> Message:
        """The next message of the body, by the deadline; takes the slot it then needs."""
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeoutError from None
        self.complete = message["type"] != "http.request" or not message.get("more_body")
        self._take(self.complete)
        return message

    # ------------------------------------------------------------ the ASGI callables

    async def receive(self) -> Message:
        if self.first is not None:
            message, self.first = self.first, None
        elif self.complete:
            message = await self._receive()
        else:
            message = await self.next_part()
        if self.cap is not None and message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.cap:
                raise TooLargeError
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            if not self.complete:  # answered early: the slot goes, the rest is dropped
                self.release()
                assert self.deadline is not None
                loop_time = asyncio.get_running_loop().time()
                self.close_after = min(self.deadline, loop_time + _DRAIN_SECONDS)
            extra = [_CLOSE, self._header] if self.close_after is not None else [self._header]
            message["headers"] = [*message.get("headers", ()), *extra]
        elif (kind == "http.response.body" and self.close_after is not None
              and not message.get("more_body")):
            await self._send({**message, "more_body": True})
            await _drain(self._receive, self.close_after)
            message = {"type": "http.response.body", "body": b""}
        await self._send(message)


async def _drain(receive: Receive, until: float) -> None:
    seen = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(until):
            while seen <= _DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    return
                seen += len(message.get("body", b""))

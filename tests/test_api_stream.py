"""The live tail over HTTP, against a real uvicorn server: Server-Sent Events and WebSocket,
resuming, filters, errors, lagging clients, and shutdown with streams open."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests import handlers
from tests.conftest import write_organism
from tests.test_pump import ITEM_XSD, ORGANISM, item
from xml_pipeline.api import stream
from xml_pipeline.api.stream import feed, sse
from xml_pipeline.config import Organism, load_organism
from xml_pipeline.envelope import format_timestamp
from xml_pipeline.errors import LogCorruptedError
from xml_pipeline.events import CATALOGUE, Event, MessageAccepted, MessageDelivered, Recorded
from xml_pipeline.log.file import open_file_log
from xml_pipeline.runtime.pump import Pump, open_pump

Frame = dict[str, str]


class Server(uvicorn.Server):
    """uvicorn that says when it has started, and ends the event streams as shutdown begins
    (uvicorn waits for open responses before it runs the lifespan's shutdown)."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.app = app
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stream.close_streams(self.app)
        await super().shutdown(sockets)


@dataclass
class Served:
    app: Starlette
    server: Server
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @property
    def pump(self) -> Pump:
        pump: Pump = self.app.state.pump
        return pump

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def ws(self) -> str:
        return f"{self.base.replace('http', 'ws', 1)}/ws"


@asynccontextmanager
async def serve(tmp_path: Path, *, send_buffer: int | None = None) -> AsyncIterator[Served]:
    """A real server on a free loopback port running the pump test organism on a file log."""
    handlers.reset()
    organism = load_organism(write_organism(tmp_path / "org", ORGANISM,
                                            schemas={"item.xsd": ITEM_XSD}))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with await open_file_log(tmp_path / "events") as log, \
                open_pump(organism, log) as pump:
            app.state.pump = pump
            yield

    app = Starlette(routes=[Mount("/api/v1", routes=stream.routes)], lifespan=lifespan)
    listener = socket.socket()
    if send_buffer is not None:  # inherited by accepted connections
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = Server(uvicorn.Config(app, log_level="warning"), app)
    with listener:
        async with asyncio.TaskGroup() as group:
            group.create_task(server.serve(sockets=[listener]))
            await server.ready.wait()
            assert server.started
            try:
                yield Served(app, server, port)
            finally:
                server.should_exit = True


async def frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """The SSE frames of ``response``: ``{"id", "event", "data"}`` or ``{"comment"}``."""
    fields: Frame = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
        elif line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        elif fields:
            yield fields
            fields = {}


async def take(events: AsyncIterator[Frame], count: int) -> list[Frame]:
    taken: list[Frame] = []
    while len(taken) < count:
        frame = await anext(events)
        if "comment" not in frame:
            taken.append(frame)
    return taken


async def take_until(events: AsyncIterator[Frame], kind: str) -> list[Frame]:
    taken: list[Frame] = []
    while not taken or taken[-1]["event"] != kind:
        taken.extend(await take(events, 1))
    return taken


async def records(pump: Pump, after: int = 0) -> list[Recorded]:
    return [record async for record in pump.log.read(after)]


def thread_positions(log: list[Recorded], thread: str) -> list[int]:
    """The positions a thread filter must give, worked out from the whole log."""
    ids = {r.event.message_id for r in log
           if isinstance(r.event, MessageAccepted) and r.event.thread_id == thread}
    return [r.position for r in log if getattr(r.event, "thread_id", None) == thread
            or (getattr(r.event, "thread_id", None) is None
                and getattr(r.event, "message_id", None) in ids)]


def positions(taken: list[Frame]) -> list[int]:
    for frame in taken:
        assert json.loads(frame["data"])["position"] == int(frame["id"])
    return [int(frame["id"]) for frame in taken]


def body(record: Recorded) -> dict[str, Any]:
    event: Event = record.event
    return {"position": record.position, "type": type(event).__name__,
            "at": format_timestamp(event.at), "data": msgspec.to_builtins(event)}


async def run(pump: Pump, payload: str, to: str = "first") -> str:
    accepted = await pump.inject(payload, to=to)
    await pump.wait_idle()
    return accepted.thread_id


# ------------------------------------------------------------------ Server-Sent Events


async def test_a_conversation_arrives_in_position_order_with_ids(tmp_path: Path) -> None:
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        pump = served.pump
        start = pump.log.last_position
        async with client.stream("GET", served.events) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            # The stream starts at the end of the log: only what happens from now on.
            thread = await run(pump, item(7))
            taken = await take_until(frames(response), "ThreadCompleted")
        log = await records(pump, start)
        assert positions(taken) == [r.position for r in log][:len(taken)]
        assert [json.loads(f["data"]) for f in taken] == [body(r) for r in log[:len(taken)]]
        assert [f["event"] for f in taken] == [type(r.event).__name__ for r in log[:len(taken)]]
        accepted = [json.loads(f["data"])["data"] for f in taken
                    if f["event"] == "MessageAccepted"]
        assert [(a["sender"], a["to"], a["thread_id"]) for a in accepted] == [
            ("api", "first", thread), ("first", "second", thread), ("second", "third", thread)]
        assert json.loads(taken[-1]["data"])["data"]["thread_id"] == thread


async def test_after_and_last_event_id_resume_exactly_after_a_position(tmp_path: Path) -> None:
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        pump = served.pump
        await run(pump, item(1))
        last = pump.log.last_position
        middle = last // 2
        cases = [({"after": middle}, {}, middle), ({"after": 0}, {}, 0),
                 ({"after": last}, {"Last-Event-ID": str(middle)}, middle),
                 ({"after": middle}, {"Last-Event-ID": "not-a-position"}, middle)]
        for params, headers, after in cases:
            async with client.stream("GET", served.events, params=params,
                                     headers=headers) as response:
                taken = await take(frames(response), last - after)
            assert positions(taken) == list(range(after + 1, last + 1)), (params, headers)
            assert [json.loads(f["data"]) for f in taken] == [
                body(r) for r in await records(pump, after)]


async def test_filters_by_thread_agent_and_type(tmp_path: Path) -> None:
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        pump = served.pump
        start = pump.log.last_position
        chain = await run(pump, item(1))
        echo = await run(pump, item(2), to="caller")
        log = await records(pump, start)

        async def filtered(params: dict[str, Any], count: int) -> list[Frame]:
            async with client.stream("GET", served.events,
                                     params={"after": start, **params}) as response:
                return await take(frames(response), count)

        for thread in (chain, echo):
            expected = thread_positions(log, thread)
            assert positions(await filtered({"thread": thread}, len(expected))) == expected
        expected = [r.position for r in log if "second" in (
            getattr(r.event, name, None) for name in ("listener", "agent", "sender", "to"))]
        assert len(expected) == 4  # accepted for it, delivered, handled, and its own send
        assert positions(await filtered({"agent": "second"}, len(expected))) == expected
        wanted = ("MessageAccepted", "ThreadCompleted")
        expected = [r.position for r in log if type(r.event).__name__ in wanted]
        assert len(expected) == 3 + 1 + 3 + 1
        for params in ({"type": list(wanted)}, {"type": ",".join(wanted)}):
            assert positions(await filtered(params, len(expected))) == expected
        # The thread filter learns message ids from events that the type filter drops.
        expected = [p for p in thread_positions(log, echo)
                    if type(next(r for r in log if r.position == p).event).__name__
                    == "HandlerSucceeded"]
        assert len(expected) == 3
        taken = await filtered({"thread": echo, "type": "HandlerSucceeded"}, len(expected))
        assert positions(taken) == expected


async def test_a_thread_filter_opened_mid_thread_follows_its_pending_messages(
        tmp_path: Path) -> None:
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        pump = served.pump
        start = pump.log.last_position
        accepted = await pump.inject(item(1), to="slow")
        tail = cast(AsyncGenerator[Recorded, None], pump.log.follow(start))
        async with aclosing(tail):
            async for record in tail:  # until the slow handler holds the message
                if isinstance(record.event, MessageDelivered):
                    break
        opened_at = pump.log.last_position
        async with client.stream("GET", served.events,
                                 params={"thread": accepted.thread_id}) as response:
            handlers.gate.set()
            await pump.wait_idle()
            taken = await take_until(frames(response), "ThreadCompleted")
        expected = [p for p in thread_positions(await records(pump), accepted.thread_id)
                    if p > opened_at]
        assert positions(taken) == expected
        # Among them the slow handler's success, which names only the message.
        assert ("HandlerSucceeded", accepted.message_id) in [
            (f["event"], json.loads(f["data"])["data"].get("message_id")) for f in taken]


async def test_bad_after_and_type_are_400_with_the_error_shape(tmp_path: Path) -> None:
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        last = served.pump.log.last_position
        for after in ("-1", "abc", "1.5", "", str(last + 1)):
            response = await client.get(served.events, params={"after": after})
            assert response.status_code == 400
            assert response.json()["error"] == {
                "code": "invalid_request",
                "message": f"'after' must be a log position, a whole number from 0 to {last}, "
                           f"not {after!r}.",
                "details": {"parameter": "after", "last_position": last},
                "request_id": None}
        response = await client.get(served.events, headers={"Last-Event-ID": str(last + 5)})
        assert response.status_code == 400
        response = await client.get(served.events,
                                    params={"type": ["MessageAccepted,Bogus", "Nope"]})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["message"] == ("Unknown event type 'Bogus', 'Nope'; details.valid_types "
                                    "lists the types there are.")
        assert error["details"] == {"parameter": "type", "unknown": ["Bogus", "Nope"],
                                    "valid_types": sorted(CATALOGUE)}
        response = await client.get(served.events, params={"thread": ""})
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "'thread' must be a non-empty string, " \
                                                      "not ''."


async def test_keepalive_comments_while_idle(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE_INTERVAL", 0.01)
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        async with client.stream("GET", served.events) as response:
            assert await anext(frames(response)) == {"comment": "keepalive"}


async def test_line_separators_in_data_stay_inside_one_frame(tmp_path: Path) -> None:
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        pump = served.pump
        start = pump.log.last_position
        text = "a\u2028b\u2029c\u0085d"
        async with client.stream("GET", served.events,
                                 params={"type": "MessageAccepted"}) as response:
            await run(pump, item(text))
            taken = await take(frames(response), 3)
        log = await records(pump, start)
        assert [json.loads(f["data"]) for f in taken] == [
            body(r) for r in log if isinstance(r.event, MessageAccepted)]
        assert f"<n>{text}</n>" in json.loads(taken[0]["data"])["data"]["envelope"]


async def test_the_stream_ends_when_the_client_goes(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        async with client.stream("GET", served.events, params={"after": 0}) as response:
            await take(frames(response), 1)
        # The request's task ends once the disconnect is seen (nothing else would end it).
        await asyncio.wait(set(served.server.server_state.tasks))
        assert not served.server.server_state.tasks
        await run(served.pump, item(1))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# ------------------------------------------------------------------ lagging clients

SEND_BUFFER = 64 * 1024
RECEIVE_BUFFER = (socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)


async def flood(pump: Pump) -> None:
    """About 4.5 MB of events: 30 conversations of three 50 kB messages."""
    for k in range(30):
        await run(pump, item(f"{k}-{'x' * 50_000}"))


async def test_a_lagging_client_is_told_where_to_resume_and_disconnected(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed, "MAX_LAG", 50)
    # Fixed socket buffers (a few hundred kB in all) so that a client that stops reading soon
    # blocks the stream's writes, while the bus writes megabytes; the pump must not notice.
    transport = httpx.AsyncHTTPTransport(socket_options=[RECEIVE_BUFFER])
    async with serve(tmp_path, send_buffer=SEND_BUFFER) as served, \
            httpx.AsyncClient(transport=transport, timeout=60) as client:
        pump = served.pump
        async with client.stream("GET", served.events) as response:
            events = frames(response)
            await run(pump, item(0))
            live = await take_until(events, "ThreadCompleted")
            # The client reads nothing while the bus writes far more than the buffers hold.
            await flood(pump)
            rest = [frame async for frame in events if "comment" not in frame]
        notice = rest.pop()
        assert notice["event"] == "lagging"
        after = int(notice["id"])
        last = json.loads(notice["data"])["last_position"]
        assert json.loads(notice["data"]) == {
            "after": after, "last_position": last, "max_lag": 50,
            "message": f"This stream fell more than 50 records behind the log (at position "
                       f"{after} of {last}) and was closed; reconnect with after={after} to "
                       "resume."}
        assert last - after > 50
        sent = positions(live + rest)
        assert sent == list(range(sent[0], after + 1))
        # The pump kept going, and the client resumes exactly where it was told.
        await run(pump, item("more"))
        end = pump.log.last_position
        async with client.stream("GET", served.events,
                                 headers={"Last-Event-ID": str(after)}) as response:
            resumed = await take(frames(response), end - after)
        assert positions(resumed) == list(range(after + 1, end + 1))


async def test_a_lagging_websocket_is_told_and_closed_with_1013(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed, "MAX_LAG", 50)
    async with serve(tmp_path, send_buffer=SEND_BUFFER) as served:
        pump = served.pump
        sock = socket.socket()
        sock.setsockopt(*RECEIVE_BUFFER)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
        # No compression: the bytes on the wire must be as many as the bus writes.
        async with connect(served.ws, sock=sock, max_queue=1, compression=None) as ws:
            await subscribe(ws, {})
            await flood(pump)
            received = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    received.append(json.loads(await ws.recv()))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        notice = received.pop()["lagging"]
        assert notice["last_position"] - notice["after"] > 50
        sent = [r["position"] for r in received]
        assert sent == list(range(sent[0], notice["after"] + 1))
        await run(pump, item("more"))


# ------------------------------------------------------------------ WebSocket


async def subscribe(ws: ClientConnection, options: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps({"subscribe": options}))
    subscribed: dict[str, Any] = json.loads(await ws.recv())["subscribed"]
    return subscribed


async def test_websocket_subscribe_resubscribe_and_errors(tmp_path: Path) -> None:
    async with serve(tmp_path) as served, connect(served.ws) as ws:
        pump = served.pump
        start = pump.log.last_position
        assert await subscribe(ws, {"types": ["MessageAccepted"]}) == {
            "after": start, "thread": None, "agent": None, "types": ["MessageAccepted"]}
        thread = await run(pump, item(3))
        got = [json.loads(await ws.recv()) for _ in range(3)]
        log = await records(pump, start)
        assert got == [body(r) for r in log if isinstance(r.event, MessageAccepted)]
        assert {g["data"]["thread_id"] for g in got} == {thread}

        # Invalid messages are answered and the connection stays open.
        invalid: list[tuple[str, str, str | None]] = [
            ("not json", "invalid_json", None),
            ("[1]", "invalid_request", 'Send {"subscribe": {...}} with any of "after", '
                                       '"thread", "agent" and "types".'),
            ('{"subscribe": {"colour": "red"}}', "invalid_request",
             'Send {"subscribe": {...}} with any of "after", "thread", "agent" and "types", '
             "not ['colour']."),
            ('{"subscribe": {"after": -1}}', "invalid_request",
             f"'after' must be a log position, a whole number from 0 to "
             f"{pump.log.last_position}, not -1."),
            ('{"subscribe": {"types": ["Bogus"]}}', "invalid_request",
             "Unknown event type 'Bogus'; details.valid_types lists the types there are."),
            ('{"subscribe": {"types": "MessageAccepted"}}', "invalid_request",
             "'types' must be a list of event type names, not 'MessageAccepted'."),
        ]
        for text, code, message in invalid:
            await ws.send(text)
            error = json.loads(await ws.recv())["error"]
            assert error["code"] == code
            assert message is None or error["message"] == message

        # A new subscription replaces the old one.
        assert (await subscribe(ws, {"after": 0, "types": ["OrganismStarted"]}))["after"] == 0
        assert json.loads(await ws.recv()) == body((await records(pump))[0])
        await run(pump, item(4))
        wanted = await subscribe(ws, {"after": start, "thread": thread})
        assert wanted == {"after": start, "thread": thread, "agent": None, "types": None}
        expected = thread_positions(await records(pump, start), thread)
        assert [json.loads(await ws.recv())["position"] for _ in expected] == expected


# ------------------------------------------------------------------ shutdown


async def test_the_server_shuts_down_cleanly_with_streams_open(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serve(tmp_path) as served, httpx.AsyncClient() as client:
        async with client.stream("GET", served.events, params={"after": 0}) as response, \
                connect(served.ws) as ws:
            await subscribe(ws, {"after": 0})
            await ws.recv()
            events = frames(response)
            await take(events, 1)
            served.server.should_exit = True
            rest = [frame async for frame in events]  # ends without an error
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code in (1001, 1012)
        assert all("comment" in f or f["event"] in CATALOGUE for f in rest)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not any("timeout graceful shutdown" in r.getMessage() for r in caplog.records)
    async with await open_file_log(tmp_path / "events", readonly=True) as log:
        assert type([r async for r in log.read()][-1].event).__name__ == "OrganismStopped"


# ------------------------------------------------------------------ a damaged log


async def damaged_log(tmp_path: Path, organism: Organism | None = None, to: str = "third",
                      payload: Callable[[int], str] = item) -> int:
    """A log in ``tmp_path / "events"`` of small segments, stopped gracefully (so a snapshot
    covers it all), with one byte flipped inside a record in the middle of a sealed segment:
    opening passes (it checks the ends of sealed segments, not every record), reading
    through it fails. The last good position before the damage."""
    handlers.reset()
    organism = organism or load_organism(write_organism(tmp_path / "first", ORGANISM,
                                                        schemas={"item.xsd": ITEM_XSD}))
    async with await open_file_log(tmp_path / "events", segment_bytes=8192) as log, \
            open_pump(organism, log) as pump:
        for n in range(60):
            await pump.inject(payload(n), to=to)
        await pump.wait_idle()
    sealed = sorted((tmp_path / "events").glob("*.log"))[1]
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0x01
    sealed.write_bytes(bytes(data))
    async with await open_file_log(tmp_path / "events", readonly=True) as log:
        good = 0
        with pytest.raises(LogCorruptedError) as damage:
            async for record in log.read():
                good = record.position
    assert damage.value.position == good + 1
    return good


async def test_a_stream_that_reaches_damage_says_so_and_ends_and_the_server_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = await damaged_log(tmp_path)
    async with serve(tmp_path) as served, httpx.AsyncClient(timeout=30) as http:
        async with http.stream("GET", served.events, params={"after": 0}) as response:
            taken = [frame async for frame in frames(response) if "comment" not in frame]
        error = taken.pop()
        assert (error["event"], int(error["id"])) == ("error", good)
        notice = json.loads(error["data"])["error"]
        assert (notice["code"], notice["after"]) == ("log_corrupted", good)
        assert f"damaged at position {good + 1}" in notice["message"]
        assert positions(taken) == list(range(1, good + 1))
        async with connect(served.ws) as ws:
            await subscribe(ws, {"after": 0})
            received = []
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    received.append(json.loads(await ws.recv()))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        assert received.pop()["error"] == notice
        assert [r["position"] for r in received] == list(range(1, good + 1))
        await run(served.pump, item("after"), to="third")  # the organism goes on
    assert not [r for r in caplog.records if r.exc_info]  # a line each, no traceback
    assert [r.getMessage() for r in caplog.records if "event stream stopped" in r.getMessage()
            ] == [f"An event stream stopped after position {good}: {notice['message']}"] * 2

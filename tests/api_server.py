"""A real uvicorn server for API tests, on a free loopback port, in this event loop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from xml_pipeline.api.server import Server, config
from xml_pipeline.config import Organism


@asynccontextmanager
async def running_server(organism: Organism, data: Path, *, token: str | None = None
                         ) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """Yield ``(base_url, stop_event)`` of a server running ``organism`` on log ``data``."""
    stop = asyncio.Event()
    cfg = config(organism, host="127.0.0.1", port=0, data=data, token=token,
                 access_log=False, stop=stop)
    cfg.log_level = "warning"
    server = Server(cfg)
    # A socket that listens already: clients may connect at once; the kernel holds their
    # connections until the server (after its lifespan has started the pump) accepts them.
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
    # are TCP, and with Nagle on every keep-alive request waits 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}", stop
    finally:
        server.should_exit = True
        await task
        sock.close()


def client(base: str, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=base + "/api/v1", headers=headers, timeout=30)

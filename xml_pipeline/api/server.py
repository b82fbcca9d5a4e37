"""Serving the API with uvicorn (uvloop and httptools when installed).

``serve`` refuses to listen on a non-loopback address unless an API token is set, and stops
gracefully on SIGINT/SIGTERM or ``POST /api/v1/organism/stop``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import importlib.util
import ipaddress
import logging
import signal
import socket
from contextlib import suppress
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from xml_pipeline.api.app import create_app
from xml_pipeline.api.auth import TOKEN_ENV
from xml_pipeline.api.stream import close_streams
from xml_pipeline.organism import Organism

__all__ = ["Server", "UnsafeBindError", "config", "is_loopback", "serve", "steady_heap"]


class UnsafeBindError(Exception):
    pass


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGINT/SIGTERM that stopped it gracefully is not raised
    again afterwards (a graceful stop exits with status 0; a second SIGINT forces the exit), and
    that open event streams are ended first, so that shutdown does not wait on them."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if isinstance(self.config.app, Starlette):
            close_streams(self.config.app)
        await super().shutdown(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config(organism: Organism, *, host: str, port: int, data: Path | None, token: str | None,
           access_log: bool, stop: asyncio.Event | None = None, watch: bool = False
           ) -> uvicorn.Config:
    if not is_loopback(host) and not token:
        raise UnsafeBindError(
            f"Refusing to listen on {host}: without an API token anyone who can reach it could "
            f"control the organism. Set {TOKEN_ENV}, or listen on 127.0.0.1.")
    app = create_app(organism, data=data, token=token, stop=stop, watch=watch)
    return uvicorn.Config(
        app, host=host, port=port, lifespan="on", access_log=access_log,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level="info", timeout_graceful_shutdown=15,
    )


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 256 * 1024


def steady_heap() -> bool:
    """Make glibc give every allocation over 256 KiB its own mapping, returned when freed.

    By default glibc raises that threshold whenever such a block is freed, after which large
    short-lived buffers (log reads, snapshots) come from the heap and fragment it: a server
    that followed its log grew by about 50 bytes per record. Fixing the threshold keeps memory
    flat (see the load soak in docs/benchmarks.md). Returns False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1)


async def serve(organism: Organism, *, host: str, port: int, data: Path | None = None,
                token: str | None = None, access_log: bool = True, watch: bool = True) -> None:
    """Run the API (and so the pump) until a signal or ``POST /organism/stop``."""
    steady_heap()
    stop = asyncio.Event()
    server = Server(config(organism, host=host, port=port, data=data, token=token,
                                   access_log=access_log, stop=stop, watch=watch))

    async def watch_stop() -> None:
        await stop.wait()
        logging.getLogger("xml_pipeline.api").info("stop requested over the API")
        server.should_exit = True

    watcher = asyncio.ensure_future(watch_stop())
    try:
        await server.serve()
    finally:
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher

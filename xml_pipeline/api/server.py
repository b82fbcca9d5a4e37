"""Serving the API with uvicorn (uvloop and httptools when installed).

``serve`` refuses to listen on a non-loopback address unless an API token is set, and stops
gracefully on SIGINT/SIGTERM or ``POST /api/v1/organism/stop``. It takes the address first,
then opens the log and starts the pump, then serves: an address in use or a locked or damaged
log fails before anything is recorded, with one error (``CannotBindError``, ``LogError``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import gc
import importlib.util
import ipaddress
import logging
import signal
import socket
from collections.abc import Coroutine
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette

from xml_pipeline.api.app import create_app, open_organism
from xml_pipeline.api.auth import TOKEN_ENV
from xml_pipeline.api.stream import close_streams
from xml_pipeline.config import Organism
from xml_pipeline.runtime.pump import Pump

__all__ = ["CannotBindError", "Server", "UnsafeBindError", "config", "is_loopback",
           "listening_socket", "loop_name", "run_until_complete", "serve", "steady_heap"]

T = TypeVar("T")


class UnsafeBindError(Exception):
    pass


class CannotBindError(Exception):
    """The API's address cannot be taken (in use, not ours, not allowed)."""


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGINT/SIGTERM that stopped it gracefully is not raised
    again afterwards (a graceful stop exits with status 0; a second SIGINT forces the exit), and
    that open event streams are ended first, so that shutdown does not wait on them."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:  # uvicorn says where it listens only for its own sockets
            host, port = sockets[0].getsockname()[:2]
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on http://%s:%d (Press CTRL+C to quit; event loop: %s)",
                f"[{host}]" if ":" in host else host, port, loop_name())

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


def _check_safe(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise UnsafeBindError(
            f"Refusing to listen on {host}: without an API token anyone who can reach it could "
            f"control the organism. Set {TOKEN_ENV}, or listen on 127.0.0.1.")


_BIND_REASONS = {
    errno.EADDRINUSE: "the address is already in use. Stop what listens there, or choose "
                      "another --port.",
    errno.EACCES: "permission denied. Ports below 1024 need privileges: choose another --port.",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address. Choose another "
                         "--host.",
}


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, or ``CannotBindError``.

    IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they
    are TCP, and with Nagle on every keep-alive request waits 40 ms for a delayed ACK."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise CannotBindError(f"Cannot listen on {host}:{port}: the host name does not "
                              f"resolve ({exc.strerror}). Choose another --host.") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = _BIND_REASONS.get(exc.errno or 0, f"{exc.strerror}.")
        raise CannotBindError(f"Cannot listen on {host}:{port}: {reason}") from None
    return sock


def config(organism: Organism, *, host: str, port: int, data: Path | None, token: str | None,
           access_log: bool, stop: asyncio.Event | None = None, watch: bool = False,
           pump: Pump | None = None) -> uvicorn.Config:
    _check_safe(host, token)
    app = create_app(organism, data=data, token=token, stop=stop, watch=watch, pump=pump)
    return uvicorn.Config(
        app, host=host, port=port, lifespan="on", access_log=access_log,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level="info", timeout_graceful_shutdown=15,
    )


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD = 256 * 1024


def loop_name() -> str:
    """The running event loop's implementation: ``uvloop`` or ``asyncio``."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def run_until_complete(main: Coroutine[Any, Any, T], *, loop: str = "asyncio") -> T:
    """Run ``main`` to its end on asyncio's own loop, or on uvloop (``loop="uvloop"``).

    asyncio's is the default: under a flood of clients that never back off, uvloop leaves
    about 1% of the accepted requests waiting for the whole flood (docs/benchmarks.md, the
    load soak), where asyncio's loop answers every one within a quarter of a second.

    ``uvicorn.Config(loop="uvloop")`` only applies when uvicorn creates the loop itself; a
    server started inside a running loop (as ``serve`` is) runs on whatever loop that is."""
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


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
    _check_safe(host, token)
    directory = data if data is not None else organism.log.path
    if directory is None:
        raise ValueError("This organism has no file log path; pass data=DIR.")
    sock = listening_socket(host, port)
    try:
        async with open_organism(organism, directory) as pump:
            # What start-up built (modules, schemas, the replayed state) lives until exit:
            # moved out of the collector's generations, its full passes no longer scan it.
            gc.collect()
            gc.freeze()
            stop = asyncio.Event()
            server = Server(config(organism, host=host, port=sock.getsockname()[1],
                                   data=directory, token=token, access_log=access_log,
                                   stop=stop, watch=watch, pump=pump))

            async def watch_stop() -> None:
                await stop.wait()
                logging.getLogger("xml_pipeline.api").info("stop requested over the API")
                server.should_exit = True

            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(watch_stop())
                try:
                    await server.serve(sockets=[sock])
                finally:
                    watcher.cancel()
    finally:
        sock.close()

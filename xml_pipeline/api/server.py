"""Serving the API with uvicorn (uvloop and httptools when installed).

``serve`` refuses to listen on a non-loopback address unless an API token is set, and stops
gracefully on SIGINT/SIGTERM or ``POST /api/v1/organism/stop``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import signal
from contextlib import suppress
from pathlib import Path
from types import FrameType

import uvicorn

from xml_pipeline.api.app import create_app
from xml_pipeline.api.auth import TOKEN_ENV
from xml_pipeline.organism import Organism

__all__ = ["UnsafeBindError", "is_loopback", "serve"]


class UnsafeBindError(Exception):
    pass


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGINT/SIGTERM that stopped it gracefully is not raised
    again afterwards: a graceful stop exits with status 0. A second SIGINT forces the exit."""

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
           access_log: bool, stop: asyncio.Event | None = None) -> uvicorn.Config:
    if not is_loopback(host) and not token:
        raise UnsafeBindError(
            f"Refusing to listen on {host}: without an API token anyone who can reach it could "
            f"control the organism. Set {TOKEN_ENV}, or listen on 127.0.0.1.")
    app = create_app(organism, data=data, token=token, stop=stop)
    return uvicorn.Config(
        app, host=host, port=port, lifespan="on", access_log=access_log,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level="info", timeout_graceful_shutdown=15,
    )


async def serve(organism: Organism, *, host: str, port: int, data: Path | None = None,
                token: str | None = None, access_log: bool = True) -> None:
    """Run the API (and so the pump) until a signal or ``POST /organism/stop``."""
    stop = asyncio.Event()
    server = _Server(config(organism, host=host, port=port, data=data, token=token,
                                   access_log=access_log, stop=stop))

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

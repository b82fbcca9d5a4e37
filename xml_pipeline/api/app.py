"""The Starlette application: routes under ``/api/v1``, the pump owned by the lifespan.

``create_app(organism)`` opens the organism's file log and runs the pump for the lifetime of
the application; ``app.state.pump`` is what every endpoint acts on. Errors are always JSON
(``{"error": {code, message, details, request_id}}``), never a stack trace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from xml_pipeline.api import commands, stream, views
from xml_pipeline.api.commands import inject
from xml_pipeline.api.metrics import Observer, metrics
from xml_pipeline.api.middleware.guard import Guard
from xml_pipeline.api.openapi import document
from xml_pipeline.api.responses import ApiError, JSONResponse, client_gone, error_response
from xml_pipeline.config import Organism
from xml_pipeline.errors import XmlPipelineError
from xml_pipeline.log import open_log
from xml_pipeline.runtime.pump import Pump, open_pump
from xml_pipeline.runtime.reload import watch as reload_watch

__all__ = ["create_app", "open_organism"]

_log = logging.getLogger("xml_pipeline.api")


async def health(request: Request) -> Response:
    pump = request.app.state.pump
    failing = pump.fault is not None
    return JSONResponse({"status": "failing" if failing else "ok",
                         "position": pump.state.position,
                         "error": str(pump.fault) if failing else None},
                        status_code=503 if failing else 200)


async def openapi(request: Request) -> Response:
    """The OpenAPI document, generated from the routes' docstrings (once per application)."""
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = document(_api_routes())
    return JSONResponse(state.openapi)


def _api_routes() -> list[Any]:
    """Every route under /api/v1, ``POST /inject`` first: Starlette tries routes in order,
    and inject is the one the load is on (each route tried costs a regular-expression match)."""
    routes = [*views.routes, *commands.routes, *stream.routes]
    return sorted(routes, key=lambda route: getattr(route, "path", "") != "/inject")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request, exc)


async def _bus_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, XmlPipelineError)
    return error_response(request, ApiError.from_error(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = {404: f"There is no route {request.url.path!r}; see /api/v1/openapi.json.",
               405: f"{request.method} is not allowed on {request.url.path!r}."}.get(
                   exc.status_code, str(exc.detail))
    return error_response(request, ApiError(code, message, status=exc.status_code,
                                            headers=exc.headers))


async def _client_gone(request: Request, exc: Exception) -> Response:
    return error_response(request, client_gone())


async def _internal_error(request: Request, exc: Exception) -> Response:
    request_id = request.scope.get("state", {}).get("request_id")
    _log.exception("internal error in %s %s (request %s)", request.method, request.url.path,
                   request_id, exc_info=exc)
    # This answer leaves through Starlette's outermost middleware, past the one that adds
    # X-Request-ID to every other answer: add it here.
    return error_response(request, ApiError(
        "internal_error", "An internal error occurred; the request id identifies it in the "
                          "server log.", status=500,
        headers={"X-Request-ID": request_id} if isinstance(request_id, str) else None))


def _max_requests(app: Starlette) -> int:
    limit: int = app.state.pump.organism.api.max_requests
    return limit


def _body_timeout(app: Starlette) -> float:
    timeout: float = app.state.pump.organism.api.body_timeout
    return timeout


async def _watch_files(pump: Pump, *, until: asyncio.Event) -> None:
    """Reload ``pump``'s organism whenever one of its files changes, until ``until`` is set.

    If watching fails, the error is logged at once and raised when ``until`` is set (as the
    application shuts down): raised at once, it would make the lifespan's task group cancel
    the lifespan, and with it the pump, under the requests still being served."""
    try:
        await reload_watch(pump, stop=until)
    except Exception:
        _log.exception("Watching the organism's files failed: changes to them are not "
                       "reloaded until a restart (POST /api/v1/organism/reload still works).")
        await until.wait()
        raise


@asynccontextmanager
async def open_organism(organism: Organism, directory: Path, *, stop_timeout: float = 10.0
                        ) -> AsyncIterator[Pump]:
    """Open the organism's file log in ``directory`` and run its pump until exit.

    Everything that can stop an organism from starting (a locked or damaged log, a failed
    replay) fails here, before anything is served or recorded."""
    log = await open_log(dataclasses.replace(organism.log, path=directory, url=None))
    try:
        async with open_pump(organism, log, stop_timeout=stop_timeout,
                             snapshot_every=organism.log.snapshot_every) as pump:
            yield pump
    finally:
        await log.aclose()


def create_app(organism: Organism, *, data: Path | None = None, token: str | None = None,
               max_body: int | None = None, stop_timeout: float = 10.0,
               stop: asyncio.Event | None = None, watch: bool = False,
               pump: Pump | None = None) -> Starlette:
    """The API application for ``organism``, logging to ``data`` (default: its log path).

    Given a running ``pump`` (see ``open_organism``), the application serves it and leaves
    opening and closing it to the caller."""
    directory = data if data is not None else organism.log.path
    if directory is None and pump is None:
        raise ValueError("This organism has no file log path; pass data=DIR.")

    def running() -> AbstractAsyncContextManager[Pump]:
        if pump is not None:
            return nullcontext(pump)
        assert directory is not None
        return open_organism(organism, directory, stop_timeout=stop_timeout)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with running() as pump:
            observer = Observer()
            pump.observe(observer)
            app.state.pump = pump
            app.state.observer = observer
            app.state.stop = stop if stop is not None else asyncio.Event()
            if not watch:
                yield
                return
            # organism.yaml, its XSDs and handler modules are watched while it runs.
            unwatch = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                group.create_task(_watch_files(pump, until=unwatch))
                try:
                    yield
                finally:
                    unwatch.set()

    limit = max_body if max_body is not None else organism.limits.max_bytes
    middleware = [
        # The limits in force are the running organism's: a reload changes them.
        Middleware(Guard, token=token, limit=lambda: _max_requests(app),
                   body_timeout=lambda: _body_timeout(app), max_body=limit,
                   uncounted=("/api/v1/events", "/health", "/metrics"),
                   self_limited=("/api/v1/inject",),
                   # The load is on inject: it skips Starlette's routing and request.
                   direct={("POST", "/api/v1/inject"): inject.direct}),
    ]
    routes = [
        Mount("/api/v1", routes=[
            *_api_routes(),
            Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        ]),
        Route("/health", health, methods=["GET"], include_in_schema=False),
        Route("/metrics", metrics, methods=["GET"], include_in_schema=False),
    ]
    handlers: dict[Any, Any] = {
        ApiError: _api_error,
        XmlPipelineError: _bus_error,
        HTTPException: _http_error,
        ClientDisconnect: _client_gone,
        Exception: _internal_error,
    }
    app: Starlette = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                               exception_handlers=handlers)
    return app



"""FastAPI app factories: `create_app` (node-facing, TCP) and `create_admin_app` (unix socket only)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from coordinator import acting
from coordinator.api import admin, adminhttp, health, node, paths, register, stream
from coordinator.api import tokens as tokens_api
from coordinator.core import Core
from coordinator.errors import CoordinatorError
from coordinator.relay.service import RelayService
from coordinator.relay.service import router as relay_router
from coordinator.settings import Settings
from coordinator.web import dashboard

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
    Awaitable[None],
]


class BodyLimit:
    """Reject request bodies above `limit` bytes with 413 before the app parses them; with `timeout`, a
    body not complete that many seconds after the request began is answered 408 and the connection closed
    (issue 13: uvicorn has no body timeout, so a ``Content-Length`` and silence held a connection and a
    task forever; the front's pre-auth caps count the connection meanwhile)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _too_large(send, self.limit)
                return
        seen = 0
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout
        body_done = False
        answered = False  #: our 408 went out: whatever the app sends after it is dropped

        async def limited() -> dict[str, Any]:
            nonlocal seen, body_done, answered
            if body_done or deadline is None:
                message: dict[str, Any] = await receive()  # after the body: a disconnect, no deadline
            else:
                try:
                    async with asyncio.timeout_at(deadline):  # keeps a cancellation (wait_for may not)
                        message = await receive()
                except TimeoutError:
                    answered = True
                    await _status(send, 408, "request body not received in time", close=True)
                    raise _BodyTimeout from None
                body_done = not message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not answered:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except _BodyTooLarge:
            await _too_large(send, self.limit)
        except _BodyTimeout:
            pass  # answered already
        except Exception:
            if not answered:
                raise
            # the app turned our _BodyTimeout into an error of its own (FastAPI: "error parsing the body")


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


async def _too_large(send: Any, limit: int) -> None:
    await _status(send, 413, f"request body larger than {limit} bytes")


async def _status(send: Any, status: int, detail: str, close: bool = False) -> None:
    body = f'{{"detail":"{detail}"}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _install_common(app: FastAPI, core: Core) -> None:
    app.state.core = core

    @app.exception_handler(CoordinatorError)
    async def _coordinator_error(_: Request, exc: CoordinatorError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"invalid request: {where}: {first.get('msg', 'malformed')}" if where else "invalid request"
        return JSONResponse({"detail": message}, status_code=422)

    app.add_middleware(Timing, core=core)


class Timing:
    """Request latency per route into the metrics; a plain ASGI middleware (Starlette's
    BaseHTTPMiddleware costs a task group and a streamed response per request: issue 16's enrollment)."""

    def __init__(self, app: ASGIApp, core: Core) -> None:
        self.app = app
        self.core = core

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            with acting.request_scope():
                await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            self.core.metrics.latency.labels(label).observe(time.perf_counter() - start)


def create_app(settings: Settings, core: Core | None = None) -> FastAPI:
    """The node-facing app. Without `core`, its lifespan starts and stops one."""
    owned = core is None
    the_core = core or Core(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if owned:
            await the_core.start()
        relay.start()
        try:
            yield
        finally:
            await relay.stop()
            if owned:
                await the_core.stop()

    app = FastAPI(title="coordinator", version="0.1.0", lifespan=lifespan)
    _install_common(app, the_core)
    relay = RelayService.for_core(the_core, embedded=settings.relay)
    app.state.relay = relay
    for r in (health.router, register.router, node.router, stream.router, relay_router(relay)):
        app.include_router(r)
    app.include_router(paths.router)  # meshd's path reports (issue 18)
    if not settings.metrics_listen:
        # public by default (as before); with `metrics_listen` it is served only there, 404 here
        app.include_router(health.metrics_router)
    # every admin.sock route again under /api/v1, behind scoped tokens; the dashboard under /admin
    adminhttp.install(app, create_admin_app(the_core))
    dashboard.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body, timeout=settings.preauth_timeout)
    return app


def create_admin_app(core: Core) -> FastAPI:
    """The admin app; bind it only to the unix socket."""
    app = FastAPI(title="coordinator admin", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    _install_common(app, core)
    app.include_router(admin.router)
    app.include_router(tokens_api.router)
    app.include_router(paths.admin_router)
    app.include_router(health.router)
    app.include_router(health.metrics_router)
    app.add_middleware(BodyLimit, limit=2 * 1024 * 1024)
    return app


def create_metrics_app(core: Core) -> FastAPI:
    """Only ``/metrics`` (and ``/healthz``), for the `metrics_listen` address (a scrape network)."""
    app = FastAPI(
        title="coordinator metrics", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.core = core
    app.include_router(health.router)
    app.include_router(health.metrics_router)
    return app

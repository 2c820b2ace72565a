"""The admin API on the node port: every admin.sock route under ``/api/v1``, behind scoped bearer tokens.

``/api/v1/admin/nodes`` is ``/admin/nodes`` on admin.sock, and so on for every route the admin app has
(read from it when the node app is built, so routes added later are served here too). Each call needs
``Authorization: Bearer meshtok-...`` with a live token whose scope allows the route
(coordinator/tokens.py :data:`~coordinator.tokens.ROUTE_SCOPES`, default ``admin``); each allowed call
is an audit record with the token's id. Failed attempts are limited per source address and overall.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coordinator import acting, tokens
from coordinator.core import Core
from coordinator.errors import CoordinatorError, Forbidden, Unauthorized
from coordinator.ratelimit import TokenBuckets

log = logging.getLogger("coordinator.adminhttp")

PREFIX = "/api/v1"
#: failed token checks: per source address 10 at once, then one per 2 s; all sources together 50 at
#: once, then 5 per second (a guess at a 256-bit token is hopeless anyway; this bounds the work and logs)
PER_SOURCE = (0.5, 10.0)
OVERALL = (5.0, 50.0)

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="admin token",
    description="`coordinator tokens create --scope SCOPE` prints one; send it as `Bearer meshtok-...`.",
)


class TooManyAttempts(CoordinatorError):
    status = 429


class AttemptLimiter:
    """Failed token checks per source and overall (sans-IO token buckets; the caller passes ``now``)."""

    def __init__(
        self, per_source: tuple[float, float] = PER_SOURCE, overall: tuple[float, float] = OVERALL
    ) -> None:
        self.sources: TokenBuckets[str] = TokenBuckets(*per_source)
        self.overall: TokenBuckets[str] = TokenBuckets(*overall)

    def may_try(self, source: str, now: float) -> bool:
        return self.sources.peek(source, now) and self.overall.peek("*", now)

    def failed(self, source: str, now: float) -> None:
        self.sources.allow(source, now)
        self.overall.allow("*", now)


def limiter(app: FastAPI) -> AttemptLimiter:
    gate = getattr(app.state, "admin_attempts", None)
    if not isinstance(gate, AttemptLimiter):
        gate = app.state.admin_attempts = AttemptLimiter()
    return gate


def source_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(core: Core, gate: AttemptLimiter, token: str | None, source: str) -> tokens.TokenInfo:
    """The live token, or 401 (429 once the source or everybody failed too often). Never logs the token."""
    now = time.monotonic()
    if not gate.may_try(source, now):
        raise TooManyAttempts("too many failed token attempts: wait a minute and try again")
    if not token:
        gate.failed(source, now)
        raise _unauthorized("missing bearer token: pass --token-file (`coordinator tokens create`)")
    try:
        return await tokens.check(core, token, time.time())
    except Unauthorized:
        gate.failed(source, now)
        log.warning("refused an admin token from %s (unknown, expired or revoked)", source)
        raise _unauthorized("invalid token (unknown, expired or revoked)") from None


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> tokens.TokenInfo:
    core: Core = request.app.state.core
    source = source_of(request)
    info = await authenticate(
        core, limiter(request.app), credentials.credentials if credentials else None, source
    )
    route = getattr(request.scope.get("route"), "path", request.url.path).removeprefix(PREFIX)
    if not tokens.allowed(info.scope, request.method, route):
        raise Forbidden(
            f"token {info.id} has scope {info.scope!r}, which does not allow {request.method} {route}"
        )
    await tokens.record_use(core, info, request.method, route, source)
    acting.set_token(info.id)  # the route's own audit records name the token, not `admin`
    return info


def _admin_routers(admin_app: FastAPI) -> list[APIRouter]:
    """The routers of ``admin_app`` that serve ``/admin/...`` (FastAPI includes routers by reference, so
    routes added to them later are served too)."""
    found: list[APIRouter] = []
    loose = APIRouter()
    for r in admin_app.routes:
        router = getattr(r, "original_router", None)  # an included router (FastAPI >= 0.16x)
        if isinstance(router, APIRouter):
            if any(getattr(x, "path", "").startswith("/admin/") for x in router.routes):
                found.append(router)
        elif isinstance(r, APIRoute) and r.path.startswith("/admin/"):
            loose.routes.append(r)
    return [*found, loose] if loose.routes else found


def install(app: FastAPI, admin_app: FastAPI) -> None:
    """Serve every ``/admin/...`` route of ``admin_app`` on ``app`` under :data:`PREFIX`, token-gated."""
    limiter(app)
    remote = APIRouter(prefix=PREFIX, dependencies=[Depends(require_token)])
    for router in _admin_routers(admin_app):
        remote.include_router(router)
    app.include_router(remote)

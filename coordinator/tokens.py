"""Scoped admin API tokens: created, listed, revoked, and checked on every remote admin call.

A token is ``meshtok-`` and 43 random URL-safe characters, shown once; only its SHA-256 is stored (a
256-bit random secret needs no slow hash), with its first characters for display. Each token has one
scope; a route's required scopes come from :data:`ROUTE_SCOPES` (anything not listed needs ``admin``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select, update

from coordinator.core import Core
from coordinator.db.models import AdminToken
from coordinator.errors import BadRequest, NotFound, Unauthorized

TOKEN_PREFIX = "meshtok-"
SCOPES = ("read", "nodes", "keys", "policy", "audit", "admin")
MAX_LIFETIME = 3 * 365 * 86400.0
DEFAULT_LIFETIME = 90 * 86400.0

#: (method, route path as the admin router declares it) -> scopes that may call it, besides ``admin``.
#: ``read`` sees the network (nodes, users, policy) but not the audit trail, which is ``audit``'s; each
#: write scope may also read what it changes. A route missing here needs ``admin``: a route added later
#: is closed to narrower tokens until someone decides which scope it belongs to.
ROUTE_SCOPES: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/admin/users"): frozenset({"read", "keys"}),
    ("POST", "/admin/keys"): frozenset({"keys"}),
    ("GET", "/admin/nodes"): frozenset({"read", "nodes"}),
    ("DELETE", "/admin/nodes/{name}"): frozenset({"nodes"}),
    ("POST", "/admin/nodes/{name}/expire"): frozenset({"nodes"}),
    ("POST", "/admin/nodes/{name}/rename"): frozenset({"nodes"}),
    ("POST", "/admin/nodes/{name}/tags"): frozenset({"nodes"}),
    ("POST", "/admin/nodes/{name}/relay"): frozenset({"nodes"}),  # peer relay on/off (issue 14)
    ("POST", "/admin/approve"): frozenset({"nodes"}),
    ("GET", "/admin/pending"): frozenset({"read", "nodes"}),
    ("GET", "/admin/policy"): frozenset({"read", "policy"}),
    ("PUT", "/admin/policy"): frozenset({"policy"}),
    ("GET", "/admin/audit"): frozenset({"audit"}),
    ("GET", "/admin/audit/verify"): frozenset({"audit"}),
    ("GET", "/admin/routes"): frozenset({"read", "nodes"}),
    ("POST", "/admin/nodes/{name}/routes/approve"): frozenset({"nodes"}),
    ("POST", "/admin/nodes/{name}/routes/remove"): frozenset({"nodes"}),
    ("GET", "/admin/paths"): frozenset({"read", "nodes"}),
    ("GET", "/admin/dns"): frozenset({"read", "nodes"}),  # admin-defined DNS records (issue 17)
}

#: Admin routes decided to need ``admin`` (users, the records every node resolves, the signing key, tokens
#: themselves). Every admin route is either in :data:`ROUTE_SCOPES` or here
#: (tests/coordinator/test_admin_tokens.py checks it), so a new route is a decision, not an accident.
ADMIN_ONLY: frozenset[tuple[str, str]] = frozenset(
    {
        ("POST", "/admin/users"),
        ("PUT", "/admin/dns/{name}"),
        ("DELETE", "/admin/dns/{name}"),
        ("POST", "/admin/signing-key/rotate"),
        ("POST", "/admin/tokens"),
        ("GET", "/admin/tokens"),
        ("DELETE", "/admin/tokens/{token_id}"),
    }
)


def allowed(scope: str, method: str, route: str) -> bool:
    """May a token of ``scope`` call ``method route`` (the route's path template)?"""
    return scope == "admin" or scope in ROUTE_SCOPES.get((method.upper(), route), frozenset())


@dataclass(frozen=True, slots=True)
class NewToken:
    id: int
    token: str  #: shown once
    prefix: str
    scope: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    prefix: str
    scope: str
    description: str
    created_at: float
    expires_at: float
    revoked_at: float | None
    last_used_at: float | None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at <= now else "active"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def looks_like_token(text: str) -> bool:
    return text.startswith(TOKEN_PREFIX) and 0 < len(text) <= 100 and text.isascii()


def _info(row: AdminToken) -> TokenInfo:
    return TokenInfo(
        row.id,
        row.prefix,
        row.scope,
        row.description,
        row.created_at,
        row.expires_at,
        row.revoked_at,
        row.last_used_at,
    )


async def create(core: Core, scope: str, lifetime: float, description: str, actor: str) -> NewToken:
    if scope not in SCOPES:
        raise BadRequest(f"unknown scope {scope!r}: one of {', '.join(SCOPES)}")
    if not 0 < lifetime <= MAX_LIFETIME:
        raise BadRequest("token lifetime must be positive and at most 3 years (1095d)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = time.time()
    async with core.transaction() as tx:
        row = AdminToken(
            token_hash=hash_token(token),
            prefix=token[: len(TOKEN_PREFIX) + 6],
            scope=scope,
            description=description,
            created_at=now,
            expires_at=now + lifetime,
        )
        tx.session.add(row)
        await tx.session.flush()
        await tx.audit(
            actor,
            "token.created",
            f"token:{row.id}",
            {"scope": scope, "expires_at": row.expires_at, "token_prefix": row.prefix},
        )
    return NewToken(row.id, token, row.prefix, scope, row.expires_at)


async def list_tokens(core: Core) -> list[TokenInfo]:
    async with core.read() as s:
        rows = (await s.execute(select(AdminToken).order_by(AdminToken.id))).scalars().all()
    return [_info(r) for r in rows]


async def revoke(core: Core, token_id: int, actor: str) -> None:
    async with core.transaction() as tx:
        row = await tx.session.get(AdminToken, token_id)
        if row is None:
            raise NotFound(f"unknown token id {token_id}")
        if row.revoked_at is None:
            row.revoked_at = time.time()
            await tx.audit(actor, "token.revoked", f"token:{token_id}", {"scope": row.scope})


async def check(core: Core, token: str, now: float) -> TokenInfo:
    """The live token behind ``token``, or Unauthorized (unknown, expired and revoked look alike)."""
    if not looks_like_token(token):
        raise Unauthorized("invalid token")
    digest = hash_token(token)
    async with core.read() as s:
        row = (
            await s.execute(select(AdminToken).where(AdminToken.token_hash == digest))
        ).scalar_one_or_none()
    # the lookup is by hash; compare again in constant time so a near-miss costs the same
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise Unauthorized("invalid token")
    if row.revoked_at is not None or row.expires_at <= now:
        raise Unauthorized("invalid token")
    return _info(row)


async def by_id(core: Core, token_id: int, now: float) -> TokenInfo:
    """A still valid token by id (a dashboard session re-checks its token on every request)."""
    async with core.read() as s:
        row = await s.get(AdminToken, token_id)
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        raise Unauthorized("token revoked or expired: log in again")
    return _info(row)


async def record_use(
    core: Core, info: TokenInfo, method: str, route: str, source: str, via: str = "api"
) -> None:
    """Every use of a token is an audit record with the token's id as the actor."""
    now = time.time()
    async with core.transaction() as tx:
        await tx.session.execute(update(AdminToken).where(AdminToken.id == info.id).values(last_used_at=now))
        await tx.audit(
            f"token:{info.id}",
            "token.used",
            f"{method} {route}"[:255],
            {"scope": info.scope, "source": source, "via": via},
        )

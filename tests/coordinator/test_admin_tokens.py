"""The admin API on the node port: scoped tokens, their audit trail, expiry, revocation, brute force."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from coordinator import tokens
from coordinator.api.adminhttp import PER_SOURCE
from coordinator.app import create_admin_app, create_app
from coordinator.db.models import AdminToken
from coordinator.settings import Settings
from coordinator.web import dashboard
from meshd.control import PendingApproval
from tests.coordinator.conftest import Coord
from tests.eventually import eventually_async

API = "/api/v1"


async def make_token(coord: Coord, scope: str, expiration: float | None = None) -> tuple[int, str]:
    body: dict[str, Any] = {"scope": scope}
    if expiration is not None:
        body["expiration"] = expiration
    r = await coord.admin.post("/admin/tokens", json=body)
    assert r.status_code == 201, r.text
    return int(r.json()["id"]), str(r.json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(coord: Coord, token: str, method: str, path: str, body: Any = None) -> httpx.Response:
    return await coord.api.request(method, API + path, json=body, headers=bearer(token))


#: every admin route: (method, route as declared, path called, valid body). Order matters where a call
#: changes what a later one sees (the removal and the rename go last). Fixtures: see _every_route_setup.
EVERY_ROUTE: list[tuple[str, str, str, Any]] = [
    ("GET", "/admin/users", "/admin/users", None),
    ("POST", "/admin/users", "/admin/users", {"name": "bob"}),
    ("POST", "/admin/keys", "/admin/keys", {"user": "alice"}),
    ("GET", "/admin/dns", "/admin/dns", None),
    ("PUT", "/admin/dns/{name}", "/admin/dns/printer.lan", {"ip": "192.0.2.9"}),
    ("DELETE", "/admin/dns/{name}", "/admin/dns/nas.lan", None),
    ("GET", "/admin/nodes", "/admin/nodes", None),
    ("GET", "/admin/pending", "/admin/pending", None),
    ("POST", "/admin/approve", "/admin/approve", "CODE"),  # the body is filled in with the pending code
    ("POST", "/admin/nodes/{name}/tags", "/admin/nodes/web1/tags", {"tags": ["web"]}),
    ("POST", "/admin/nodes/{name}/relay", "/admin/nodes/web1/relay", {"on": True}),
    ("GET", "/admin/routes", "/admin/routes", None),
    (
        "POST",
        "/admin/nodes/{name}/routes/approve",
        "/admin/nodes/web1/routes/approve",
        {"prefix": "10.8.0.0/24"},
    ),
    (
        "POST",
        "/admin/nodes/{name}/routes/remove",
        "/admin/nodes/web1/routes/remove",
        {"prefix": "10.9.0.0/24"},
    ),
    ("GET", "/admin/paths", "/admin/paths", None),
    ("GET", "/admin/policy", "/admin/policy", None),
    ("PUT", "/admin/policy", "/admin/policy", {"policy": ""}),
    ("GET", "/admin/audit", "/admin/audit", None),
    ("GET", "/admin/audit/verify", "/admin/audit/verify", None),
    ("POST", "/admin/signing-key/rotate", "/admin/signing-key/rotate", {}),
    ("GET", "/admin/tokens", "/admin/tokens", None),
    ("POST", "/admin/tokens", "/admin/tokens", {"scope": "read"}),
    ("DELETE", "/admin/tokens/{token_id}", "/admin/tokens/OTHER", None),  # another token's id
    ("POST", "/admin/nodes/{name}/expire", "/admin/nodes/old1/expire", None),
    ("POST", "/admin/nodes/{name}/rename", "/admin/nodes/ren1/rename", {"new_name": "ren2"}),
    ("DELETE", "/admin/nodes/{name}", "/admin/nodes/web1", None),  # last: it removes the node
]


def admin_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every ``/admin/...`` route the admin app (admin.sock) serves."""
    found: set[tuple[str, str]] = set()
    todo: list[Any] = list(app.routes)
    while todo:
        r = todo.pop()
        included = getattr(r, "original_router", None)  # FastAPI includes routers by reference
        if included is not None:
            todo.extend(included.routes)
        elif isinstance(r, APIRoute) and r.path.startswith("/admin/"):
            found |= {(m, r.path) for m in r.methods if m != "HEAD"}
    return found


async def test_the_scope_table_names_exactly_the_admin_routes(coord: Coord) -> None:
    served = admin_routes(create_admin_app(coord.core))
    table, admin_only = set(tokens.ROUTE_SCOPES), set(tokens.ADMIN_ONLY)
    assert not table & admin_only, "a route is both scoped and admin-only"
    assert table - served == set(), "the scope table names routes nobody serves"
    assert served - table - admin_only == set(), "admin routes without a scope decision: add them to one"
    assert admin_only - served == set()
    # the dashboard's pages stand for real routes too
    assert {route for route in dashboard.PAGE_ROUTES.values()} <= served
    # and the parametrized scope test below calls every one of them
    assert {(m, route) for m, route, _, _ in EVERY_ROUTE} == served


async def _every_route_setup(coord: Coord) -> dict[str, str]:
    """What the calls of EVERY_ROUTE act on, made over admin.sock: nodes web1, old1 and ren1, a pending
    machine, a DNS record nas.lan, an approved route 10.9.0.0/24 of web1 and a token to revoke."""
    key = await coord.user_and_key("alice", reusable=True)
    for name in ("web1", "old1", "ren1"):
        await coord.enroll(name, key)
    waiting = await coord.client().register("desk")
    assert isinstance(waiting, PendingApproval)
    assert (await coord.admin.put("/admin/dns/nas.lan", json={"ip": "192.0.2.8"})).status_code == 200
    r = await coord.admin.post("/admin/nodes/web1/routes/approve", json={"prefix": "10.9.0.0/24"})
    assert r.status_code == 200, r.text
    other, _ = await make_token(coord, "read")
    return {"CODE": waiting.code, "OTHER": str(other)}


@pytest.mark.parametrize("scope", tokens.SCOPES)
async def test_each_scope_can_do_exactly_what_the_table_says_on_every_route(coord: Coord, scope: str) -> None:
    fill = await _every_route_setup(coord)
    _, token = await make_token(coord, scope)
    for method, route, path, body in EVERY_ROUTE:
        path = path.replace("OTHER", fill["OTHER"])
        if body == "CODE":
            body = {"code": fill["CODE"]}
        r = await call(coord, token, method, path, body)
        if scope == "admin" or scope in tokens.ROUTE_SCOPES.get((method, route), frozenset()):
            assert r.status_code < 400, f"{scope} token: {method} {path} -> {r.status_code} {r.text}"
        else:
            assert r.status_code == 403, f"{scope} token: {method} {path} -> {r.status_code} {r.text}"
            assert "does not allow" in r.json()["detail"]
    names = [n["name"] for n in (await coord.admin.get("/admin/nodes")).json()]
    assert ("web1" in names) == (scope not in ("nodes", "admin"))  # a read token cannot remove a node
    assert ("desk" in names) == (scope in ("nodes", "admin"))  # approved


async def test_pending_machines_are_listed(coord: Coord) -> None:
    assert (await coord.admin.get("/admin/pending")).json() == []
    first = await coord.client().register("Desk\x1b[31m")
    second = await coord.client().register("laptop")
    assert isinstance(first, PendingApproval) and isinstance(second, PendingApproval)
    _, token = await make_token(coord, "read")
    listed = (await call(coord, token, "GET", "/admin/pending")).json()
    assert [(w["code"], w["hostname"]) for w in listed] == [
        (first.code, "desk--31m"),
        (second.code, "laptop"),
    ]
    assert listed[0]["expires_at"] == pytest.approx(first.expires_at)
    await coord.admin.post("/admin/approve", json={"code": second.code})
    assert [w["code"] for w in (await coord.admin.get("/admin/pending")).json()] == [first.code]


def test_a_route_missing_from_the_table_needs_admin() -> None:
    for scope in tokens.SCOPES:
        assert tokens.allowed(scope, "POST", "/admin/some-future-thing") == (scope == "admin")
    assert tokens.allowed("read", "get", "/admin/nodes")  # the method's case does not matter


async def test_every_use_is_audited_with_the_tokens_id(coord: Coord) -> None:
    token_id, token = await make_token(coord, "read")
    assert (await call(coord, token, "GET", "/admin/nodes")).status_code == 200
    assert (await call(coord, token, "DELETE", "/admin/nodes/nobody")).status_code == 403
    records = (await coord.admin.get("/admin/audit")).json()
    uses = [r for r in records if r["actor"] == f"token:{token_id}"]
    assert [(u["action"], u["object"]) for u in uses] == [("token.used", "GET /admin/nodes")]
    assert uses[0]["details"]["scope"] == "read"
    admin_id, admin = await make_token(coord, "admin")
    assert (await call(coord, admin, "POST", "/admin/users", {"name": "carol"})).status_code == 201
    records = (await coord.admin.get("/admin/audit")).json()
    assert [(r["actor"], r["action"]) for r in records[-2:]] == [
        (f"token:{admin_id}", "token.used"),
        (f"token:{admin_id}", "user.created"),  # the action itself names the token too
    ]
    assert (await coord.admin.post("/admin/users", json={"name": "dave"})).status_code == 201
    assert (await coord.admin.get("/admin/audit")).json()[-1]["actor"] == "admin"  # admin.sock: as before
    listed = {t["id"]: t for t in (await coord.admin.get("/admin/tokens")).json()}
    assert listed[token_id]["last_used_at"] is not None and listed[token_id]["state"] == "active"
    assert "token" not in listed[token_id]  # the token itself is shown once, at creation


async def test_expired_and_revoked_tokens_get_401(coord: Coord) -> None:
    _, short = await make_token(coord, "admin", expiration=2.0)  # long enough on a loaded machine
    revoked_id, revoked = await make_token(coord, "admin")
    _, control = await make_token(coord, "admin")
    assert (await call(coord, short, "GET", "/admin/nodes")).status_code == 200
    assert (await call(coord, revoked, "GET", "/admin/nodes")).status_code == 200
    assert (await coord.admin.delete(f"/admin/tokens/{revoked_id}")).status_code == 204
    r = await call(coord, revoked, "GET", "/admin/nodes")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"

    async def expired() -> bool:
        return (await call(coord, short, "GET", "/admin/nodes")).status_code == 401

    await eventually_async(expired, within=10, what="the short-lived token is refused")
    assert (await call(coord, control, "GET", "/admin/nodes")).status_code == 200  # positive control
    states = {t["id"]: t["state"] for t in (await coord.admin.get("/admin/tokens")).json()}
    assert states[revoked_id] == "revoked" and sorted(states.values()) == ["active", "expired", "revoked"]


async def test_no_token_or_a_malformed_one_gets_401(coord: Coord) -> None:
    assert (await coord.api.get(API + "/admin/nodes")).status_code == 401
    for bad in ("meshtok-", "meshtok-" + "A" * 43, "x" * 5000, "meshkey-abc"):
        r = await coord.api.get(API + "/admin/nodes", headers=bearer(bad))
        assert r.status_code == 401, bad[:20]
    r = await coord.api.get(API + "/admin/nodes", headers={"Authorization": "Basic YTpi"})
    assert r.status_code == 401


@pytest.mark.hostile
async def test_brute_force_is_rate_limited_per_source(coord: Coord, settings: Settings) -> None:
    _, good = await make_token(coord, "read")
    app = create_app(settings, core=coord.core)
    attacker = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("192.0.2.66", 4000)), base_url="http://c"
    )
    honest = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("192.0.2.7", 4000)), base_url="http://c"
    )
    async with attacker, honest:
        codes = []
        for i in range(40):  # bounded: 40 guesses
            guess = f"meshtok-{i:043d}"
            codes.append((await attacker.get(API + "/admin/nodes", headers=bearer(guess))).status_code)
        burst = int(PER_SOURCE[1])
        assert codes[:burst] == [401] * burst
        assert set(codes[burst + 1 :]) == {429}, codes  # (one more may have refilled meanwhile)
        # even the right token is not checked from the limited source: guessing it there gains nothing
        assert (await attacker.get(API + "/admin/nodes", headers=bearer(good))).status_code == 429
        # positive control: another source with the right token is served
        assert (await honest.get(API + "/admin/nodes", headers=bearer(good))).status_code == 200


async def test_a_token_never_appears_in_logs_or_audit(coord: Coord, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token_id, token = await make_token(coord, "nodes")
    await call(coord, token, "GET", "/admin/nodes")
    await call(coord, token, "PUT", "/admin/policy", {"policy": ""})  # refused: 403
    await call(coord, token[:-1] + ("A" if token[-1] != "A" else "B"), "GET", "/admin/nodes")  # 401
    await coord.admin.delete(f"/admin/tokens/{token_id}")
    await call(coord, token, "GET", "/admin/nodes")  # 401 after revocation
    audit = (await coord.admin.get("/admin/audit")).text
    for text in (caplog.text, audit):
        assert token not in text and token[8:] not in text and token[-20:] not in text
    assert "refused an admin token" in caplog.text  # failures are logged (without the token)


async def test_only_the_tokens_hash_is_stored(coord: Coord, settings: Settings) -> None:
    token_id, token = await make_token(coord, "read")
    assert (await call(coord, token, "GET", "/admin/nodes")).status_code == 200  # used: the row is written
    secret = token[len(tokens.TOKEN_PREFIX) :]
    async with coord.core.read() as s:
        row = await s.get(AdminToken, token_id)
        assert row is not None
        values = {c.name: getattr(row, c.name) for c in AdminToken.__table__.columns}
    assert values["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert values["last_used_at"] is not None
    for column, value in values.items():  # the prefix column holds its first 6 characters, no more
        assert secret[6:] not in str(value) and token not in str(value), column
    assert values["prefix"] == token[: len(tokens.TOKEN_PREFIX) + 6]
    if not settings.database.startswith("sqlite"):
        return
    # nowhere in the database file either (nor its write-ahead log): not in any other table, row or page
    db = Path(settings.database.split("///", 1)[1])
    files = [f for f in (db, Path(f"{db}-wal")) if f.exists()]
    assert db in files
    for f in files:
        data = f.read_bytes()
        assert secret[6:].encode() not in data and secret[-16:].encode() not in data, f
    assert values["token_hash"].encode() in b"".join(f.read_bytes() for f in files)  # positive control


async def test_openapi_schema_and_docs_are_served(coord: Coord) -> None:
    schema = (await coord.api.get("/openapi.json")).json()
    assert "/api/v1/admin/nodes" in schema["paths"] and "/api/v1/admin/tokens" in schema["paths"]
    assert schema["components"]["securitySchemes"]["admin token"]["scheme"] == "bearer"
    assert not any(p.startswith("/admin") for p in schema["paths"])  # the dashboard is not API
    assert (await coord.api.get("/docs")).status_code == 200


async def test_bad_token_requests_get_clear_errors(coord: Coord) -> None:
    for body in ({"scope": "root"}, {"scope": "read", "expiration": -1}, {"scope": "read", "x": 1}):
        r = await coord.admin.post("/admin/tokens", json=body)
        assert r.status_code in (400, 422) and "\n" not in r.json()["detail"], r.text
    r = await coord.admin.delete("/admin/tokens/999")
    assert r.status_code == 404 and r.json()["detail"] == "unknown token id 999"

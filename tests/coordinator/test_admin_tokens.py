"""The admin API on the node port: scoped tokens, their audit trail, expiry, revocation, brute force."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator import tokens
from coordinator.api.adminhttp import PER_SOURCE
from coordinator.app import create_app
from coordinator.db.models import AdminToken
from coordinator.settings import Settings
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


#: (method, admin path, body, scopes that may) -- "admin" may everything
CALLS: list[tuple[str, str, Any, set[str]]] = [
    ("GET", "/admin/nodes", None, {"read", "nodes"}),
    ("GET", "/admin/users", None, {"read", "keys"}),
    ("GET", "/admin/policy", None, {"read", "policy"}),
    ("POST", "/admin/keys", {"user": "alice"}, {"keys"}),
    ("POST", "/admin/nodes/web1/tags", {"tags": ["web"]}, {"nodes"}),
    ("PUT", "/admin/policy", {"policy": ""}, {"policy"}),
    ("GET", "/admin/audit", None, {"audit"}),
    ("GET", "/admin/audit/verify", None, {"audit"}),
    ("POST", "/admin/users", {"name": "bob"}, set()),
    ("GET", "/admin/tokens", None, set()),
    ("DELETE", "/admin/nodes/web1", None, {"nodes"}),  # last: it removes the node
]


@pytest.mark.parametrize("scope", tokens.SCOPES)
async def test_each_scope_can_do_exactly_what_it_names(coord: Coord, scope: str) -> None:
    await coord.enroll("web1")
    _, token = await make_token(coord, scope)
    for method, path, body, scopes in CALLS:
        r = await call(coord, token, method, path, body)
        if scope == "admin" or scope in scopes:
            assert r.status_code < 400, f"{scope} token: {method} {path} -> {r.status_code} {r.text}"
        else:
            assert r.status_code == 403, f"{scope} token: {method} {path} -> {r.status_code} {r.text}"
            assert "does not allow" in r.json()["detail"]
    names = [n["name"] for n in (await coord.admin.get("/admin/nodes")).json()]
    assert ("web1" in names) == (scope not in ("nodes", "admin"))  # a read token cannot remove a node


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

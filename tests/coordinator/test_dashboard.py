"""The dashboard's session rules without a browser: cookie flags, CSRF, scopes, log-in limits."""

from __future__ import annotations

import re

import httpx
import pytest

from coordinator.app import create_app
from coordinator.settings import Settings
from coordinator.web.sessions import Sessions
from tests.coordinator.conftest import Coord

FORM = {"content-type": "application/x-www-form-urlencoded"}


async def token_of(coord: Coord, scope: str) -> str:
    r = await coord.admin.post("/admin/tokens", json={"scope": scope})
    return str(r.json()["token"])


def browser(coord: Coord, settings: Settings, host: str = "192.0.2.1") -> httpx.AsyncClient:
    """A client keeping cookies, over HTTPS (so Secure cookies come back), from address ``host``."""
    app = create_app(settings, core=coord.core)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(host, 5000)), base_url="https://coord"
    )


async def log_in(client: httpx.AsyncClient, token: str) -> httpx.Response:
    page = await client.get("/admin/login")
    pre = re.search(r'name="pre" value="([^"]+)"', page.text)
    assert pre is not None
    return await client.post("/admin/login", content=f"pre={pre[1]}&token={token}", headers=FORM)


def csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m is not None
    return m[1]


async def test_log_in_sets_a_strict_httponly_secure_cookie_without_the_token(
    coord: Coord, settings: Settings
) -> None:
    token = await token_of(coord, "read")
    async with browser(coord, settings) as client:
        r = await log_in(client, token)
        assert r.status_code == 303 and r.headers["location"] == "/admin/nodes"
        cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("meshadmin="))
        flags = {f.strip().lower() for f in cookie.split(";")}
        assert {"httponly", "secure", "samesite=strict", "path=/admin"} <= flags
        assert token not in cookie
        page = await client.get("/admin/nodes")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        assert "<script" not in page.text  # no JavaScript at all


async def test_posts_need_the_sessions_csrf_secret(coord: Coord, settings: Settings) -> None:
    await coord.enroll("victim")
    token = await token_of(coord, "admin")
    async with browser(coord, settings) as client:
        await log_in(client, token)
        confirm = await client.get("/admin/nodes/victim/remove")
        secret = csrf(confirm.text)
        for body in ("", "csrf=", "csrf=" + secret[:-1] + ("A" if secret[-1] != "A" else "B")):
            r = await client.post("/admin/nodes/victim/remove", content=body, headers=FORM)
            assert r.status_code == 403, body
        assert "victim" in [n["name"] for n in (await coord.admin.get("/admin/nodes")).json()]
        r = await client.post("/admin/nodes/victim/remove", content=f"csrf={secret}", headers=FORM)
        assert r.status_code == 303 and "removed" in r.headers["location"]  # positive control
        assert "victim" not in [n["name"] for n in (await coord.admin.get("/admin/nodes")).json()]
    records = (await coord.admin.get("/admin/audit")).json()
    removal = next(r for r in records if r["action"] == "node.removed")
    assert removal["actor"] == "token:1"


async def test_a_login_form_from_another_site_is_refused(coord: Coord, settings: Settings) -> None:
    token = await token_of(coord, "admin")
    async with browser(coord, settings) as client:  # no log-in page fetched: no double-submit cookie
        r = await client.post("/admin/login", content=f"pre=x&token={token}", headers=FORM)
        assert r.status_code == 403 and "meshadmin=" not in r.headers.get("set-cookie", "")


async def test_the_login_page_shows_only_its_own_error_messages(coord: Coord, settings: Settings) -> None:
    async with browser(coord, settings) as client:
        page = await client.get("/admin/login?error=Your%20session%20expired,%20call%20555-1234")
        assert page.status_code == 200 and "555-1234" not in page.text
        assert "too many failed" in (await client.get("/admin/login?error=limited")).text


async def test_pages_follow_the_tokens_scope(coord: Coord, settings: Settings) -> None:
    token = await token_of(coord, "read")
    async with browser(coord, settings) as client:
        await log_in(client, token)
        for path in ("/admin/nodes", "/admin/pending", "/admin/relays", "/admin/policy"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/admin/audit")).status_code == 403  # the audit trail is audit's
        assert (await client.get("/admin/nodes/x/remove")).status_code == 403
        nodes = await client.get("/admin/nodes")
        r = await client.post(
            "/admin/pending/ABCD-EFGH/approve", content=f"csrf={csrf(nodes.text)}", headers=FORM
        )
        assert r.status_code == 403


@pytest.mark.hostile
async def test_log_in_guessing_is_rate_limited(coord: Coord, settings: Settings) -> None:
    token = await token_of(coord, "read")
    async with browser(coord, settings, "192.0.2.66") as attacker:
        for i in range(12):  # bounded: the per-source burst is 10
            await log_in(attacker, f"meshtok-guess{i}")
        r = await log_in(attacker, token)
        assert r.status_code == 303 and r.headers["location"] == "/admin/login?error=limited"
        assert "meshadmin=" not in r.headers.get("set-cookie", "")
    async with browser(coord, settings, "192.0.2.7") as honest:  # positive control
        assert (await log_in(honest, token)).headers["location"] == "/admin/nodes"


async def test_a_session_ends_when_its_token_is_revoked(coord: Coord, settings: Settings) -> None:
    token = await token_of(coord, "read")
    async with browser(coord, settings) as client:
        await log_in(client, token)
        assert (await client.get("/admin/nodes")).status_code == 200
        assert (await coord.admin.delete("/admin/tokens/1")).status_code == 204
        r = await client.get("/admin/nodes")
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"


def test_sessions_expire_when_idle_and_are_bounded() -> None:
    s = Sessions(idle=10, limit=2)
    a, _ = s.open(1, "read", now=0)
    assert s.get(a, now=9) is not None and s.get(a, now=18) is not None  # use keeps it alive
    assert s.get(a, now=29) is None
    b, _ = s.open(1, "read", now=30)
    c, _ = s.open(2, "read", now=31)
    d, _ = s.open(3, "read", now=32)
    assert s.get(b, now=33) is None and s.get(c, now=33) and s.get(d, now=33)  # the oldest made room
    assert s.get(None, now=33) is None and s.get("forged", now=33) is None


async def test_log_in_is_audited_and_page_views_are_not(coord: Coord, settings: Settings) -> None:
    """docs/design.md §3.11: the 2 s reloads would bury the actions; the log-in records who may look."""
    token = await token_of(coord, "read")
    listed = (await coord.admin.get("/admin/tokens")).json()
    token_id = listed[-1]["id"]
    async with browser(coord, settings) as client:
        assert (await log_in(client, token)).status_code == 303
        for _ in range(5):
            for path in ("/admin/nodes", "/admin/relays", "/admin/pending", "/admin/policy"):
                assert (await client.get(path)).status_code == 200
    uses = [
        (r["action"], r["object"], r["details"]["via"])
        for r in (await coord.admin.get("/admin/audit")).json()
        if r["actor"] == f"token:{token_id}"
    ]
    assert uses == [("token.used", "POST /admin/login", "dashboard")]

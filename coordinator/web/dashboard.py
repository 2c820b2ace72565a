"""The web dashboard under ``/admin`` on the node port: server-rendered pages (jinja2), no JavaScript.

Log-in takes an admin token (coordinator/tokens.py) and opens a cookie session (HttpOnly, SameSite=Strict,
Secure over HTTPS, the token itself is never in the cookie). Every POST carries the session's CSRF
secret in a hidden field. What a page shows or lets one do follows the token's scope, by the same table
as the API (the page names the API route it stands for). Log-in and every action are audit records with
the token's id; the actor of an approval or removal is ``token:ID``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import select

from coordinator import approvals, audit, enrollment, nodes, tokens
from coordinator import policy as access
from coordinator.api import adminhttp
from coordinator.api.paths import path_rows
from coordinator.core import Core
from coordinator.db.models import AuditRecord, PendingEnrollment
from coordinator.errors import CoordinatorError, Unauthorized
from coordinator.web import relayusage
from coordinator.web.sessions import Session, Sessions, same

HERE = Path(__file__).parent
log = logging.getLogger("coordinator.dashboard")
COOKIE = "meshadmin"
PRE_COOKIE = "meshadmin_login"  #: double-submit secret of the log-in form (no session exists yet)
REFRESH = 2  #: seconds between reloads of the live pages (nodes, relays)
AUDIT_PAGE = 200
LOGIN_ERRORS = {
    "invalid": "invalid token (unknown, expired or revoked)",
    "limited": "too many failed token attempts: wait a minute and try again",
}

_env = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), auto_reload=False
)

#: page -> the API route whose scopes it needs (one table for both: coordinator/tokens.py)
PAGE_ROUTES = {
    "nodes": ("GET", "/admin/nodes"),
    "pending": ("GET", "/admin/pending"),
    "relays": ("GET", "/admin/nodes"),
    "policy": ("GET", "/admin/policy"),
    "audit": ("GET", "/admin/audit"),
    "approve": ("POST", "/admin/approve"),
    "remove": ("DELETE", "/admin/nodes/{name}"),
}
NAV = (
    ("nodes", "Nodes"),
    ("pending", "Approvals"),
    ("relays", "Relays"),
    ("policy", "Policy"),
    ("audit", "Audit"),
)

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_env.filters["when"] = _when


@dataclass(frozen=True, slots=True)
class Viewer:
    sid: str
    session: Session

    def may(self, page: str) -> bool:
        method, route = PAGE_ROUTES[page]
        return tokens.allowed(self.session.scope, method, route)


def _sessions(app: FastAPI) -> Sessions:
    s = getattr(app.state, "dashboard_sessions", None)
    if not isinstance(s, Sessions):
        s = app.state.dashboard_sessions = Sessions()
    return s


def _render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _env.get_template(name).render(nav=NAV, **context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def _confirm(v: Viewer, back: str, what: str, detail: str, action: str, button: str) -> HTMLResponse:
    """A page that asks before ``action`` is POSTed (no JavaScript: a form with the CSRF secret)."""
    return _render("confirm.html", v=v, page=back, what=what, detail=detail, action=action, button=button)


def _to_login() -> RedirectResponse:
    return RedirectResponse("/admin/login", status_code=303, headers=HEADERS)


async def _form(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(415, "expected a form (application/x-www-form-urlencoded)")
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, max_num_fields=20).items()}


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/admin",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def router() -> APIRouter:
    r = APIRouter(prefix="/admin", include_in_schema=False)

    async def viewer(request: Request) -> Viewer | None:
        """The session behind the cookie, if its token is still live."""
        sid = request.cookies.get(COOKIE)
        sessions = _sessions(request.app)
        session = sessions.get(sid, time.monotonic())
        if session is None or sid is None:
            return None
        try:
            await tokens.by_id(request.app.state.core, session.token_id, time.time())
        except Unauthorized:
            sessions.close(sid)
            return None
        return Viewer(sid, session)

    async def page(request: Request, name: str) -> tuple[Viewer | None, Response | None]:
        v = await viewer(request)
        if v is None:
            return None, _to_login()
        if not v.may(name):
            method, route = PAGE_ROUTES[name]
            return v, _render(
                "denied.html",
                403,
                v=v,
                page=name,
                message=f"scope {v.session.scope!r} does not allow "
                f"{method} {route}; log in with another token",
            )
        return v, None

    async def posted(request: Request, name: str) -> tuple[Viewer, dict[str, str]] | Response:
        """A POST from a live session with the right CSRF secret and scope; audited as a token use."""
        v = await viewer(request)
        if v is None:
            return _to_login()
        form = await _form(request)
        if not same(form.get("csrf"), v.session.csrf):
            return _render("denied.html", 403, v=v, page=name, message="stale or missing form secret (CSRF)")
        if not v.may(name):
            return _render("denied.html", 403, v=v, page=name, message=f"scope {v.session.scope!r} may not")
        info = await tokens.by_id(request.app.state.core, v.session.token_id, time.time())
        method, route = PAGE_ROUTES[name]
        await tokens.record_use(
            request.app.state.core, info, method, route, adminhttp.source_of(request), "dashboard"
        )
        return v, form

    async def act(request: Request, name: str, back: str, do: Callable[[str], Awaitable[str]]) -> Response:
        """Run a confirmed action as ``token:ID``; back to page ``back`` with its notice, or the error."""
        got = await posted(request, name)
        if isinstance(got, Response):
            return got
        v, _ = got
        try:
            notice = await do(f"token:{v.session.token_id}")
        except CoordinatorError as exc:
            return _render("denied.html", exc.status, v=v, page=back, message=exc.message)
        return RedirectResponse(f"/admin/{back}?notice=" + quote(notice), status_code=303)

    @r.get("/static/dashboard.css")
    async def css() -> Response:
        return Response(
            (HERE / "static" / "dashboard.css").read_bytes(),
            media_type="text/css",
            headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @r.get("")
    @r.get("/")
    async def home(request: Request) -> Response:
        return RedirectResponse("/admin/nodes" if await viewer(request) else "/admin/login", status_code=303)

    @r.get("/login")
    async def login_form(request: Request, error: str = "") -> Response:
        pre = secrets.token_urlsafe(24)
        message = LOGIN_ERRORS.get(error, "")  # only our own words: a link cannot put text on this page
        response = _render("login.html", 401 if message else 200, v=None, pre=pre, error=message)
        _cookie(response, request, PRE_COOKIE, pre, 600)
        return response

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        if not same(form.get("pre"), request.cookies.get(PRE_COOKIE)):
            return _render("login.html", 403, v=None, pre="", error="the log-in form expired: reload it")
        core: Core = request.app.state.core
        source = adminhttp.source_of(request)
        try:
            info = await adminhttp.authenticate(
                core, adminhttp.limiter(request.app), form.get("token"), source
            )
        except HTTPException:
            return RedirectResponse("/admin/login?error=invalid", status_code=303)
        except CoordinatorError as exc:  # too many attempts
            log.info("dashboard log-in refused from %s: %s", source, exc.message)
            return RedirectResponse("/admin/login?error=limited", status_code=303)
        await tokens.record_use(core, info, "POST", "/admin/login", source, "dashboard")
        sid, _ = _sessions(request.app).open(info.id, info.scope, time.monotonic())
        response = RedirectResponse("/admin/nodes", status_code=303, headers=HEADERS)
        _cookie(response, request, COOKIE, sid, None)
        response.delete_cookie(PRE_COOKIE, path="/admin")
        return response

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        v = await viewer(request)
        form = await _form(request)
        if v is not None and same(form.get("csrf"), v.session.csrf):
            _sessions(request.app).close(v.sid)
        response = _to_login()
        response.delete_cookie(COOKIE, path="/admin")
        return response

    # --------------------------------------------------------------------------------------- nodes
    @r.get("/nodes")
    async def nodes_page(request: Request, notice: str = "") -> Response:
        v, refused = await page(request, "nodes")
        if refused:
            return refused
        core: Core = request.app.state.core
        regions = {rg.id: rg.name for rg in core.state.relays}
        reported = path_rows(core)  # each node's own report of its path to each peer (issue 18)
        rows = []
        for n in await nodes.list_nodes(core):
            peer = core.state.peers.get(n.id)
            home = peer.relay_home if peer else None
            rows.append(
                {
                    "node": n,
                    "state": "expired" if n.expired else ("online" if n.online else "offline"),
                    "relay": regions.get(home, f"region {home}") if home else "-",
                    "paths": reported.get(n.name),
                }
            )
        return _render("nodes.html", v=v, page="nodes", rows=rows, refresh=REFRESH, notice=notice[:200])

    @r.get("/nodes/{name}/remove")
    async def remove_confirm(request: Request, name: str) -> Response:
        v, refused = await page(request, "remove")
        if refused:
            return refused
        assert v is not None
        what = f"Remove node {name}?"
        detail = "It is revoked at once and leaves every map; its name and address are quarantined."
        return _confirm(v, "nodes", what, detail, f"/admin/nodes/{quote(name, safe='')}/remove", "Remove")

    @r.post("/nodes/{name}/remove")
    async def remove(request: Request, name: str) -> Response:
        async def do(actor: str) -> str:
            await nodes.remove_node(request.app.state.core, name, actor)
            return f"removed node {name}"

        return await act(request, "remove", "nodes", do)

    # ------------------------------------------------------------------------------------ approvals
    @r.get("/pending")
    async def pending_page(request: Request, notice: str = "") -> Response:
        v, refused = await page(request, "pending")
        if refused:
            return refused
        assert v is not None
        rows = await approvals.list_pending(request.app.state.core)
        return _render(
            "pending.html", v=v, page="pending", rows=rows, may_approve=v.may("approve"), notice=notice[:200]
        )

    @r.get("/pending/{code}/approve")
    async def approve_confirm(request: Request, code: str) -> Response:
        v, refused = await page(request, "approve")
        if refused:
            return refused
        assert v is not None
        async with request.app.state.core.read() as s:
            row = await s.get(PendingEnrollment, code)
        if row is None:
            return _render("denied.html", 404, v=v, page="pending", message=f"unknown enrollment code {code}")
        what = f"Approve {row.hostname} ({code})?"
        detail = "The machine joins the network with the next free name and addresses."
        action = f"/admin/pending/{quote(code, safe='')}/approve"
        return _confirm(v, "pending", what, detail, action, "Approve")

    @r.post("/pending/{code}/approve")
    async def approve(request: Request, code: str) -> Response:
        async def do(actor: str) -> str:
            return f"approved node {(await enrollment.approve(request.app.state.core, code, actor)).name}"

        return await act(request, "approve", "pending", do)

    # --------------------------------------------------------------------------------------- relays
    @r.get("/relays")
    async def relays_page(request: Request) -> Response:
        v, refused = await page(request, "relays")
        if refused:
            return refused
        core: Core = request.app.state.core
        serving = relayusage.peer_relay_rows(core)
        rows = relayusage.region_rows(core, serving)
        return _render("relays.html", v=v, page="relays", rows=rows, peer_relays=serving, refresh=REFRESH)

    # --------------------------------------------------------------------------------------- policy
    @r.get("/policy")
    async def policy_page(request: Request) -> Response:
        v, refused = await page(request, "policy")
        if refused:
            return refused
        core: Core = request.app.state.core
        text = core.state.policy
        tests: list[dict[str, Any]] = []
        problem = ""
        if text.strip():
            try:
                parsed, _ = access.parse_stored(text)
                members = [core.state.member(i) for i in core.state.sorted_ids()]
                failures = access.run_tests(parsed, members)
                for t in parsed.tests:
                    lines = {t.line, *t.where.values()}
                    mine = [f for f in failures if any(f.startswith(f"line {n}:") for n in lines)]
                    tests.append({"test": t, "failures": mine})
            except (access.PolicyError, ValueError) as exc:
                problem = str(exc)
        return _render("policy.html", v=v, page="policy", text=text, tests=tests, problem=problem)

    # ---------------------------------------------------------------------------------------- audit
    @r.get("/audit")
    async def audit_page(
        request: Request, actor: str = "", action: str = "", object: str = "", since: str = ""
    ) -> Response:
        v, refused = await page(request, "audit")
        if refused:
            return refused
        q = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(AUDIT_PAGE)
        if actor:
            q = q.where(AuditRecord.actor == actor[:128])
        if action:
            q = q.where(AuditRecord.action.startswith(action[:64], autoescape=True))
        if object:
            q = q.where(AuditRecord.object.contains(object[:255], autoescape=True))
        if since:
            q = q.where(AuditRecord.time >= since[:40])
        async with request.app.state.core.read() as s:
            records = (await s.execute(q)).scalars().all()
            verdict = await audit.verify(s)
        filters = {"actor": actor, "action": action, "object": object, "since": since}
        return _render(
            "audit.html",
            v=v,
            page="audit",
            records=records,
            filters=filters,
            verdict=verdict,
            limit=AUDIT_PAGE,
        )

    return r


def install(app: FastAPI) -> None:
    _sessions(app)
    app.include_router(router())

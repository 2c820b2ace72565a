"""In-process schemathesis harness for the coordinator's node-facing API (no network: ASGI only).

`Harness` owns an event loop, a started Core on SQLite, the node-facing app wrapped in `SigningApp`, and one
enrolled test node. `SigningApp` signs each request exactly as the server will verify it (method, the
path and query the server sees, the body bytes it receives), then breaks the signature when asked: the
broken modes are the ways an attacker (or a confused client) gets the envelope wrong.

Shared by tests/fuzz/test_api_schemathesis.py (bounded, part of scripts/test) and benchmarks/fuzz_api.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from starlette.requests import Request

from coordinator.api.auth import target_of
from coordinator.app import create_admin_app, create_app
from coordinator.core import Core
from coordinator.settings import Settings
from meshd.control import ControlClient, Enrollment, NodeKeys
from meshd.proto import signing
from meshd.proto.encoding import b64decode, b64encode

#: How each request's envelope is made. "valid" signs for the enrolled node; the others are broken.
VALID = "valid"
BROKEN_MODES = (
    "absent",  # no envelope at all (what schemathesis sends by itself)
    "bad-signature",  # one bit of the signature flipped
    "wrong-key",  # signed by a key the coordinator never saw, claiming the enrolled node
    "unknown-node",  # a node id that is not enrolled
    "stale",  # signed 10 minutes ago
    "future",  # signed 10 minutes from now
    "wrong-target",  # signature over another path
    "wrong-body",  # signature over another body
    "replay",  # a captured valid request sent again: same nonce, same timestamp
    "malformed",  # envelope headers that do not parse
    "partial",  # one of the four headers missing
)
#: No signature envelope but ``Authorization: Bearer`` with an admin-scoped API token (Harness.admin_token)
ADMIN_TOKEN = "admin-token"
MODE_HEADER = "x-fuzz-sign-mode"
#: A long poll may wait up to 120 s by contract; the fuzzer caps it so one example cannot hang the run.
MAX_WAIT = 0.05


def operation_labels() -> tuple[list[str], set[str]]:
    """`METHOD /path` of every operation in the node-facing schema (built from a throw-away app), and
    those whose input (parameters or a body) negative generation can break."""
    with tempfile.TemporaryDirectory() as tmp:
        document = create_app(_settings(Path(tmp))).openapi()
    labels, with_input = [], set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            labels.append(label)
            breakable = [
                p
                for p in operation.get("parameters", [])
                if p["in"] != "path" or p.get("schema", {}).get("type") != "string"
            ]  # any string is a valid path segment: negative generation cannot break one
            if breakable or operation.get("requestBody"):
                with_input.add(label)
    return labels, with_input


def _settings(tmp: Path) -> Settings:
    state = tmp / "state"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Settings(
        state_dir=state, database=f"sqlite+aiosqlite:///{tmp / 'coordinator.db'}", listen="127.0.0.1:0"
    )


@dataclass
class SigningApp:
    """ASGI wrapper that puts a (valid or deliberately broken) signature envelope on every request."""

    app: Any
    node_id: int = 0
    node_key: bytes = b""
    used_nonce: str = ""
    used_at: float = 0.0  #: the timestamp signed with ``used_nonce``
    stranger_key: bytes = field(default_factory=lambda: os.urandom(32))
    admin_token: str = ""  #: for the ADMIN_TOKEN mode

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        mode = next((v.decode() for k, v in scope["headers"] if k == MODE_HEADER.encode()), "absent")
        # with our token, the one schemathesis may have generated for the bearer scheme goes
        drop = {MODE_HEADER.encode(), b"authorization"} if mode == ADMIN_TOKEN else {MODE_HEADER.encode()}
        headers = [(k, v) for k, v in scope["headers"] if k not in drop]
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        target = target_of(Request(scope).url)
        headers += [(k.encode(), v.encode()) for k, v in self.envelope(mode, scope["method"], target, body)]
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)

    def envelope(self, mode: str, method: str, target: str, body: bytes) -> list[tuple[str, str]]:
        if mode == "absent":
            return []
        if mode == ADMIN_TOKEN:
            assert self.admin_token, "Harness.admin_token() first"
            return [("authorization", f"Bearer {self.admin_token}")]
        now = time.time()
        key, node, nonce = self.node_key, str(self.node_id), None
        if mode == "wrong-key":
            key = self.stranger_key
        elif mode == "unknown-node":
            node = str(self.node_id + 1000)
        elif mode == "stale":
            now -= 600
        elif mode == "future":
            now += 600
        elif mode == "wrong-target":
            target += "x"
        elif mode == "wrong-body":
            body += b" "
        elif mode == "replay":
            # a captured request sent again: its nonce and its timestamp (re-signing with a fresh timestamp
            # needs the node's key, and after the window the server rightly no longer remembers the nonce)
            nonce, now = self.used_nonce, self.used_at
        out = signing.sign_request(key, node, method, target, body, now, nonce)
        if mode == VALID and not self.used_nonce:
            self.used_nonce, self.used_at = out[signing.HEADER_NONCE], now
        if mode == "bad-signature":
            raw = bytearray(b64decode(out[signing.HEADER_SIGNATURE]))
            raw[0] ^= 1
            out[signing.HEADER_SIGNATURE] = b64encode(bytes(raw))
        elif mode == "malformed":
            out = {
                signing.HEADER_NODE: "1\n2",
                signing.HEADER_TIMESTAMP: "-5",
                signing.HEADER_NONCE: "ZZ",
                signing.HEADER_SIGNATURE: "%%%",
            }
        elif mode == "partial":
            del out[signing.HEADER_NONCE]
        return list(out.items())


class LogWatch(logging.Handler):
    """Keeps every record that carries a traceback or is logged at ERROR and above."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in text:
            self.bad.append(f"{record.name}: {record.levelname}: {text[:300]}")


@dataclass
class Outcome:
    label: str
    mode: str
    status: int
    detail: str


class Harness:
    """One coordinator (in-process), one enrolled node, a schema loaded from the app's /openapi.json."""

    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = _settings(tmp)
        self.core = Core(self.settings)
        self.loop.run_until_complete(self.core.start())
        self.app = create_app(self.settings, core=self.core)
        self.signer = SigningApp(self.app)
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", self.app)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.signer), base_url="http://coordinator", timeout=30
        )
        self.logs = LogWatch()
        logging.getLogger().addHandler(self.logs)
        self.enrollment = self.loop.run_until_complete(self._enroll())
        self.signer.node_id = self.enrollment.node_id
        # One valid request first: it works (positive control) and its nonce is the one "replay" reuses.
        first = self.loop.run_until_complete(
            self.client.get("/api/v1/signing-keys", headers={MODE_HEADER: VALID})
        )
        assert first.status_code == 200 and self.signer.used_nonce, first.text
        self.examples: dict[str, int] = {}
        self.accepted: dict[str, int] = {}

    async def _enroll(self) -> Enrollment:
        admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_admin_app(self.core)), base_url="http://a"
        )
        async with admin:
            assert (await admin.post("/admin/users", json={"name": "fuzz"})).status_code == 201
            r = await admin.post("/admin/keys", json={"user": "fuzz", "reusable": True})
            assert r.status_code == 201, r.text
            key = str(r.json()["key"])
        keys = NodeKeys.generate()
        control = ControlClient("http://coordinator", keys, None, transport=httpx.ASGITransport(app=self.app))
        result = await control.register("fuzz-node", auth_key=key)
        assert isinstance(result, Enrollment), result
        self.signer.node_key = keys.node_private
        return result

    def admin_token(self) -> str:
        """An ``admin``-scoped API token (made on admin.sock) for the ADMIN_TOKEN mode: the token-gated
        ``/api/v1/admin/*`` routes past their gate."""

        async def create() -> str:
            admin = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_admin_app(self.core)), base_url="http://a"
            )
            async with admin:
                r = await admin.post("/admin/tokens", json={"scope": "admin", "description": "fuzz"})
                assert r.status_code == 201, r.text
                return str(r.json()["token"])

        self.signer.admin_token = self.loop.run_until_complete(create())
        return self.signer.admin_token

    def close(self) -> None:
        logging.getLogger().removeHandler(self.logs)
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self.core.stop())
        self.loop.close()

    def operation(self, label: str) -> Any:
        method, path = label.split(" ", 1)
        return self.schema[path][method]

    def strategy(self, label: str, mode: GenerationMode) -> Any:
        return self.operation(label).as_strategy(mode)

    def send(self, case: Any, sign_mode: str) -> httpx.Response:
        """Send one generated case through the signing wrapper; returns the response."""
        if isinstance(case.query, dict) and isinstance(case.query.get("wait"), int | float):
            case.query["wait"] = min(max(case.query["wait"], 0), MAX_WAIT)
        kw = case.as_transport_kwargs(base_url="http://coordinator")
        headers = {str(k): str(v) for k, v in (kw.get("headers") or {}).items()}
        headers[MODE_HEADER] = sign_mode
        content: bytes | None = None
        if "json" in kw:
            content = json.dumps(kw["json"]).encode()
        elif kw.get("data") is not None:
            data = kw["data"]
            content = data if isinstance(data, bytes) else str(data).encode()
        request = self.client.build_request(
            kw["method"], kw["url"], params=kw.get("params") or None, headers=headers, content=content
        )
        self.examples[case.operation.label] = self.examples.get(case.operation.label, 0) + 1
        return self.loop.run_until_complete(asyncio.wait_for(self.client.send(request), 30))

    def raw(self, method: str, path: str, body: bytes, sign_mode: str = VALID) -> httpx.Response:
        """A signed request with a body the schema does not describe."""
        headers = {MODE_HEADER: sign_mode, "content-type": "application/json"}
        request = self.client.build_request(method, path, headers=headers, content=body)
        label = f"{method} {path}"
        self.examples[label] = self.examples.get(label, 0) + 1
        return self.loop.run_until_complete(asyncio.wait_for(self.client.send(request), 30))

    def check_raw(self, label: str, response: httpx.Response) -> None:
        where = f"{label} -> {response.status_code}: {response.text[:300]!r}"
        assert not self.logs.bad, f"{where}\nlogged: {self.logs.bad}"
        assert response.status_code < 500, f"server error: {where}"
        if response.status_code >= 400:
            detail = response.json().get("detail")
            assert isinstance(detail, str) and detail and "\n" not in detail, f"bad detail: {where}"

    def check(self, case: Any, sign_mode: str, response: httpx.Response, signed_route: bool) -> Outcome:
        """The contract: no 5xx, no traceback logged, each rejection a 4xx with a one-line JSON reason."""
        label = case.operation.label
        where = f"{label} [{sign_mode}] -> {response.status_code}: {response.text[:300]!r}"
        assert not self.logs.bad, f"{where}\nlogged: {self.logs.bad}"
        assert response.status_code < 500, f"server error: {where}"
        detail = ""
        if response.status_code >= 400:
            try:
                document = response.json()
            except ValueError:
                raise AssertionError(f"rejection is not JSON: {where}") from None
            assert isinstance(document, dict) and set(document) == {"detail"}, f"not {{detail}}: {where}"
            detail = document["detail"]
            assert isinstance(detail, str) and detail, f"detail not a string: {where}"
            if label in MULTI_LINE_DETAIL:  # one line per finding, by contract: each line printable
                assert all(line.isprintable() and line for line in detail.split("\n")), f"bad lines: {where}"
            else:
                assert "\n" not in detail and "\r" not in detail, f"multi-line detail: {where}"
        if signed_route and sign_mode != VALID:
            assert 400 <= response.status_code < 500, f"broken signature accepted: {where}"
        if response.status_code < 300:
            self.accepted[label] = self.accepted.get(label, 0) + 1
        return Outcome(label, sign_mode, response.status_code, detail)

    def fuzz(self, label: str, mode: GenerationMode, sign_mode: str, examples: int) -> None:
        """`examples` generated cases of `label` sent in `sign_mode`, each checked (no signature rules)."""

        @bounded(examples)
        @given(case=self.strategy(label, mode))
        def run(case: Any) -> None:
            self.check(case, sign_mode, self.send(case, sign_mode), signed_route=False)

        run()

    def is_signed(self, label: str) -> bool:
        """Signed routes answer 401 to a request without an envelope."""
        return label not in UNSIGNED


def bounded(examples: int) -> Any:
    """Hypothesis settings of a bounded, reproducible fuzz run."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


#: Rejections that list one finding per line by contract (tests/coordinator/test_policy_api.py: a bad
#: policy's errors with their line numbers), reached only with an admin token (test_admin_token_fuzz.py)
MULTI_LINE_DETAIL = frozenset({"PUT /api/v1/admin/policy"})

#: Routes that need no signature (health, metrics, enrollment start). The status poll is signed by the
#: pending key, not the node's, so for it every mode counts as "broken" except that it may 404 first.
UNSIGNED = frozenset(
    {"GET /healthz", "GET /metrics", "POST /api/v1/register/challenge", "POST /api/v1/register"}
)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
CANDIDATE = st.one_of(
    st.text(max_size=70),
    st.sampled_from(["[2a00::1%x]:1\nremove=true\nendpoint=[::1]:51820", "1.2.3.4:0", "[::1]:65536", "a:b"]),
    st.builds(lambda a, p: f"{a}:{p}", st.ip_addresses(v=4).map(str), st.integers(-1, 70000)),
)
CLIENT_MESSAGE = st.one_of(
    st.fixed_dictionaries({"type": st.just("endpoints"), "candidates": st.lists(CANDIDATE, max_size=40)}),
    st.fixed_dictionaries({"type": st.just("signal"), "to": JSON | st.integers(), "payload": JSON}),
    st.dictionaries(st.sampled_from(["type", "candidates", "endpoints", "to", "payload"]), JSON),
)

#: Bodies for POST /api/v1/messages, whose raw body the schema does not describe.
MESSAGE_BODY = (
    st.binary(max_size=300)
    | CLIENT_MESSAGE.map(lambda o: json.dumps(o).encode())
    | JSON.map(lambda o: json.dumps(o).encode())
)


@contextmanager
def harness() -> Iterator[Harness]:
    with tempfile.TemporaryDirectory() as tmp:
        h = Harness(Path(tmp))
        try:
            yield h
        finally:
            h.close()

"""Audit export (syslog RFC 5424, JSON lines), `audit list --since`, IP truncation and retention."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as hs
from sqlalchemy import text

from coordinator import auditexport, auditretention
from coordinator.audit import AuditEntry, verify
from coordinator.core import Core
from coordinator.settings import Settings, SettingsError, load_settings
from tests.coordinator.conftest import Coord
from tests.coordinator.test_cli import cli, free_port, start_server_args, stop_server
from tests.eventually import eventually, eventually_async

# RFC 5424 §6: HEADER SP STRUCTURED-DATA [SP MSG]; the receiver's own parser, strict about the grammar
SYSLOG = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<proc>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    rb"(?P<sd>-|(?:\[[^ =\]\"]{1,32}(?: [^ =\]\"]{1,32}=\"(?:[^\"\\\]]|\\[\"\\\]])*\")*\])+)"
    rb"(?: (?P<msg>.*))?$",
    re.S,
)
SD_PARAM = re.compile(rb' ([^ =\]"]+)="((?:[^"\\\]]|\\["\\\]])*)"')


def parse_syslog(data: bytes) -> dict[str, Any]:
    m = SYSLOG.match(data)
    assert m is not None, f"not RFC 5424: {data[:200]!r}"
    sd = m.group("sd")
    sd_id = sd[1 : sd.index(b" ")].decode()
    params = {k.decode(): re.sub(rb"\\(.)", rb"\1", v).decode() for k, v in SD_PARAM.findall(sd)}
    msg = m.group("msg") or b""
    assert msg.startswith(b"\xef\xbb\xbf"), "MSG is UTF-8 with a BOM"
    return {
        "pri": int(m.group("pri")),
        "time": m.group("ts").decode(),
        "app": m.group("app").decode(),
        "msgid": m.group("msgid").decode(),
        "sd_id": sd_id,
        "params": params,
        "details": json.loads(msg[3:]),
    }


def receive_all(sock: socket.socket) -> list[dict[str, Any]]:
    got = []
    sock.setblocking(False)
    while True:
        try:
            got.append(parse_syslog(sock.recv(65536)))
        except BlockingIOError:
            return got


@pytest.fixture
def udp_receiver() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    yield s
    s.close()


# --- the real server process, driven by the CLI -------------------------------------------------------


@pytest.mark.slow
def test_serve_exports_to_syslog_and_jsonl_and_audit_list_since_filters(
    tmp_path: Path, udp_receiver: socket.socket
) -> None:
    state, port, jsonl = tmp_path / "state", free_port(), tmp_path / "audit.jsonl"
    syslog_at = f"127.0.0.1:{udp_receiver.getsockname()[1]}"
    proc = start_server_args(
        state, port, "--audit-syslog", syslog_at, "--audit-jsonl", str(jsonl), "--audit-ip-prefix", "24/48"
    )
    try:
        assert cli(state, "users", "create", "alice").returncode == 0
        made = cli(state, "keys", "create", "--user", "alice", "--reusable")
        assert made.returncode == 0, made.stderr
        key = made.stdout.split()[-1]
        listed = cli(state, "audit", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        trail = json.loads(listed.stdout)
        assert [r["action"] for r in trail][-2:] == ["user.created", "key.created"]

        # JSON lines: exactly the records `audit list --json` shows, in order
        lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
        assert lines == trail
        assert oct(jsonl.stat().st_mode & 0o777) == "0o600"

        # syslog: one RFC 5424 message per record, the record in the structured data
        msgs = eventually(
            lambda: (got := receive_all(udp_receiver)) and got, within=5, what="syslog datagrams"
        )
        while len(msgs) < len(trail):
            msgs += eventually(lambda: receive_all(udp_receiver), within=5, what="all syslog datagrams")
        for m, r in zip(msgs, trail, strict=True):
            assert m["pri"] == 13 * 8 + 6 and m["app"] == "coordinator" and m["sd_id"] == "meshvpn@32473"
            assert m["msgid"] == r["action"]
            assert m["params"] == {
                "id": str(r["id"]),
                "actor": r["actor"],
                "action": r["action"],
                "object": r["object"],
                "hash": r["hash"],
                "prev_hash": r["prev_hash"],
            }
            assert m["details"] == r["details"]
            assert datetime.fromisoformat(m["time"]) == datetime.fromisoformat(r["time"])
        assert key not in jsonl.read_text() and key not in json.dumps(msgs)

        # --since: an RFC 3339 time between two records, and an age; the --json output is one array
        cut = trail[-1]["time"]
        since = json.loads(cli(state, "audit", "list", "--json", "--since", cut).stdout)
        assert [r["id"] for r in since] == [trail[-1]["id"]]
        assert json.loads(cli(state, "audit", "list", "--json", "--since", "1h").stdout) == trail
        future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert json.loads(cli(state, "audit", "list", "--json", "--since", future).stdout) == []
        bad = cli(state, "audit", "list", "--since", "yesterday")
        assert bad.returncode == 1 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
        assert cli(state, "audit", "verify").returncode == 0
    finally:
        stop_server(proc)


async def test_admin_api_pages_by_id_and_filters_by_time(coord: Coord) -> None:
    for i in range(5):
        assert (await coord.admin.post("/admin/users", json={"name": f"u{i}"})).status_code == 201
    every = (await coord.admin.get("/admin/audit")).json()
    pages, after = [], 0
    while page := (await coord.admin.get(f"/admin/audit?limit=2&after={after}")).json():
        pages.append([r["id"] for r in page])
        after = page[-1]["id"]
    assert pages == [[1, 2], [3, 4], [5]] and len(every) == 5
    since = every[3]["time"].replace("+00:00", "Z")
    assert [r["id"] for r in (await coord.admin.get("/admin/audit", params={"since": since})).json()] == [
        4,
        5,
    ]
    bad = await coord.admin.get("/admin/audit", params={"since": "soon"})
    assert bad.status_code == 400 and "RFC 3339" in bad.text


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("audit_syslog", "nowhere", "bad --audit-syslog"),
        ("audit_syslog", "unix:", "bad --audit-syslog"),
        ("audit_syslog", "127.0.0.1:0", "the port must not be 0"),
        ("audit_ip_prefix", "33/48", "bad --audit-ip-prefix"),
        ("audit_retention", "forever", "bad duration"),
    ],
)
def test_bad_audit_settings_are_refused(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings({name: value}, env={})


def test_serve_with_a_bad_audit_flag_fails_in_one_line(tmp_path: Path) -> None:
    r = cli(tmp_path / "state", "serve", "--listen", "127.0.0.1:0", "--audit-syslog", "nowhere")
    assert r.returncode != 0 and r.stderr.startswith("error: bad --audit-syslog"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --- in-process: unix socket, IP truncation, retention ------------------------------------------------


@pytest.fixture
def unix_receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "log.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    yield s, path
    s.close()


@pytest.fixture
async def exporting(settings: Settings, unix_receiver: tuple[socket.socket, Path]) -> AsyncIterator[Core]:
    c = Core(
        dataclasses.replace(
            settings,
            audit_syslog=f"unix:{unix_receiver[1]}",
            audit_jsonl=settings.state_dir.parent / "audit.jsonl",
            audit_ip_prefix="24/48",
        )
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_unix_socket_export_and_source_addresses_truncated(
    exporting: Core, unix_receiver: tuple[socket.socket, Path]
) -> None:
    async with exporting.transaction() as tx:
        await tx.audit(
            "token:7",
            "token.used",
            "GET /admin/nodes",
            {"source": "203.0.113.77", "peer": "[2001:db8:1:2::5]:443", "seen": ["198.51.100.9:80", 3]},
        )
    [m] = eventually(lambda: receive_all(unix_receiver[0]), within=5, what="a datagram on the unix socket")
    want = {"source": "203.0.113.0/24", "peer": "2001:db8:1::/48", "seen": ["198.51.100.0/24", 3]}
    assert m["details"] == want
    async with exporting.read() as s:
        stored = (await s.execute(text("SELECT details FROM audit ORDER BY id DESC LIMIT 1"))).scalar()
    assert json.loads(stored) == want, "the database never holds the full address either"
    last = json.loads((exporting.settings.state_dir.parent / "audit.jsonl").read_text().splitlines()[-1])
    assert last["details"] == want


async def test_a_dead_syslog_receiver_never_fails_the_write(
    settings: Settings, unix_receiver: tuple[socket.socket, Path]
) -> None:
    unix_receiver[0].close()  # nobody listens any more
    c = Core(dataclasses.replace(settings, audit_syslog=f"unix:{unix_receiver[1]}"))
    await c.start()
    try:
        async with c.transaction() as tx:
            await tx.audit("admin", "user.created", "user:x")
        async with c.read() as s:
            assert (await verify(s)).ok
        assert c.audit_export.sinks[0].failed == 1  # type: ignore[union-attr]
    finally:
        await c.stop()


async def _records(core: Core, n: int) -> None:
    for i in range(n):
        async with core.transaction() as tx:
            await tx.audit("admin", "user.created", f"user:u{i}")


async def _ids(core: Core) -> list[int]:
    async with core.read() as s:
        return [int(i) for i in (await s.execute(text("SELECT id FROM audit ORDER BY id"))).scalars()]


async def test_retention_drops_old_records_and_verify_still_holds(core: Core) -> None:
    await _records(core, 130)  # checkpoints at records 1 and 100
    async with core.transaction() as tx:
        done = await auditretention.prune(tx, datetime.now(UTC) + timedelta(seconds=1))
    assert done is not None and done.through == 100 and done.records == 100
    ids = await _ids(core)
    assert ids[0] == 101 and ids[-1] == 131  # 101..130 kept, 131 is the audit.pruned record
    async with core.read() as s:
        result = await verify(s)
        last = (await s.execute(text("SELECT action, details FROM audit WHERE id = 131"))).one()
    assert result.ok and result.records == 31, result.problem
    assert last[0] == "audit.pruned" and json.loads(last[1])["through"] == 100
    # nothing newer than the limit is ever dropped, and a second run with nothing to do writes nothing
    async with core.transaction() as tx:
        assert await auditretention.prune(tx, datetime.now(UTC) - timedelta(days=1)) is None
    assert (await _ids(core))[-1] == 131
    # the chain goes on and verifies across restarts of the checkpointing
    await _records(core, 75)  # record 200 gets the next periodic checkpoint
    async with core.read() as s:
        assert (await verify(s)).ok


async def test_retention_loop_of_serve(settings: Settings) -> None:
    c = Core(dataclasses.replace(settings, audit_retention=0.5))
    await c.start()
    try:
        assert c._retention is not None  # started by --audit-retention
        await _records(c, 3)  # record 1 is checkpointed; once half a second old it may go
        loop = asyncio.create_task(auditretention.run(c, keep=0.5, every=0.05))  # serve's loop, faster
        try:
            await eventually_async(
                lambda: _first_id(c), within=10, what="the retention loop dropped record 1"
            )
        finally:
            loop.cancel()
        async with c.read() as s:
            assert (await verify(s)).ok
    finally:
        await c.stop()


async def _first_id(c: Core) -> bool:
    return (await _ids(c))[0] > 1


@pytest.mark.parametrize(
    "tamper",
    [
        "DELETE FROM audit WHERE id = 101",  # more than retention dropped
        "UPDATE meta SET value = '101:' || (SELECT hash FROM audit WHERE id = 101) WHERE key = 'audit_base'",
        "DELETE FROM audit_checkpoints WHERE seq = 100",  # the base's signed checkpoint
        "UPDATE audit SET details = '{\"through\": 99}' WHERE action = 'audit.pruned'",
    ],
)
async def test_retention_cannot_be_faked_by_whoever_edits_the_database(core: Core, tamper: str) -> None:
    await _records(core, 110)
    async with core.transaction() as tx:
        assert await auditretention.prune(tx, datetime.now(UTC) + timedelta(seconds=1)) is not None
    async with core.transaction() as tx:
        await tx.session.execute(text(tamper))
    async with core.read() as s:
        result = await verify(s)
    assert not result.ok, tamper


async def test_a_chain_deleted_from_the_start_without_retention_is_reported(core: Core) -> None:
    await _records(core, 110)
    async with core.transaction() as tx:
        await tx.session.execute(text("DELETE FROM audit WHERE id <= 100"))
    async with core.read() as s:
        result = await verify(s)
    assert not result.ok and result.problem == "record 1 is missing"


# --- formats (pure) -----------------------------------------------------------------------------------

ENTRY = AuditEntry(
    7, "2026-01-02T03:04:05.123456+00:00", "admin", "node.renamed", "node:a", {}, "0" * 64, "f" * 64
)


@given(
    actor=hs.text(max_size=40),
    obj=hs.text(max_size=60),
    action=hs.text(max_size=40),
    details=hs.dictionaries(hs.text(max_size=10), hs.text(max_size=20) | hs.integers(), max_size=4),
)
def test_any_record_makes_a_parseable_syslog_message(
    actor: str, obj: str, action: str, details: dict[str, Any]
) -> None:
    e = dataclasses.replace(ENTRY, actor=actor, object=obj, action=action, details=details)
    m = parse_syslog(auditexport.syslog_message(e, "coord host", procid=42))
    assert m["params"]["actor"] == actor and m["params"]["object"] == obj and m["params"]["action"] == action
    assert m["details"] == details
    assert m["time"] == "2026-01-02T03:04:05.123456Z"


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("24/48", auditexport.IpPrefix(24, 48)),
        ("16", auditexport.IpPrefix(16, 48)),
        ("32/128", auditexport.IpPrefix(32, 128)),
    ],
)
def test_parse_ip_prefix(value: str, want: auditexport.IpPrefix) -> None:
    assert auditexport.parse_ip_prefix(value) == want


@pytest.mark.parametrize("value", ["", "24/", "/48", "33", "24/129", "a/b", "24 48"])
def test_parse_ip_prefix_refuses(value: str) -> None:
    with pytest.raises(SettingsError):
        auditexport.parse_ip_prefix(value)


def test_settings_take_the_audit_flags() -> None:
    s = load_settings(
        {"audit_syslog": "unix:/dev/log", "audit_retention": "400d", "audit_ip_prefix": "24/48"}, env={}
    )
    assert s.audit_retention == 400 * 86400 and s.audit_syslog == "unix:/dev/log"
    assert load_settings({"audit_retention": "0"}, env={}).audit_retention == 0


@given(hs.binary(min_size=32, max_size=32), hs.sampled_from(["meshkey-", "meshtok-"]), hs.booleans())
def test_a_key_or_token_typed_into_a_name_is_redacted(raw: bytes, prefix: str, as_hostname: bool) -> None:
    import base64

    secret = prefix + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    shown = secret.lower().replace("_", "-") if as_hostname else secret  # what audit_hostname makes of it
    out = auditexport.redact(f"laptop {shown} x")
    assert shown[len(prefix) + 6 :] not in out and out.startswith(f"laptop {shown[: len(prefix) + 6]}")
    assert auditexport.redact_details({"hostname": shown, "l": [shown]}) == {
        "hostname": out[7:-2],
        "l": [out[7:-2]],
    }


def test_an_id_prefix_is_not_redacted() -> None:
    assert auditexport.redact("meshkey-abc123") == "meshkey-abc123"
    assert auditexport.redact_details({"token_prefix": "meshtok-Zx9_-a"}) == {
        "token_prefix": "meshtok-Zx9_-a"
    }

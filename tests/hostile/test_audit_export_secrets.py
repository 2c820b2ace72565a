"""Hostile: the audit export is a copy of the trail that leaves the machine (a log system, a file other
people read). Whatever clients send, neither the database nor the syslog datagrams nor the JSON lines may
carry a pre-auth key, a node's private key, or a forged second record."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from coordinator.app import create_admin_app, create_app
from coordinator.core import Core
from coordinator.settings import Settings
from meshd.control import ControlClient, ControlError, Enrollment, NodeKeys, PendingApproval
from meshd.proto.encoding import b64encode
from tests.coordinator.test_audit_export import parse_syslog, receive_all

pytestmark = pytest.mark.hostile


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "syslog.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    yield s, path
    s.close()


@pytest.fixture
async def core(tmp_path: Path, receiver: tuple[socket.socket, Path]) -> AsyncIterator[Core]:
    c = Core(
        Settings(
            state_dir=tmp_path / "state",
            listen="127.0.0.1:0",
            audit_syslog=f"unix:{receiver[1]}",
            audit_jsonl=tmp_path / "audit.jsonl",
        )
    )
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_no_pre_auth_key_or_private_key_reaches_the_export(
    core: Core, tmp_path: Path, receiver: tuple[socket.socket, Path]
) -> None:
    transport = httpx.ASGITransport(app=create_app(core.settings, core=core))
    admin = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_admin_app(core)), base_url="http://a")
    async with admin:
        assert (await admin.post("/admin/users", json={"name": "alice"})).status_code == 201
        made = await admin.post("/admin/keys", json={"user": "alice", "reusable": True})
        key = made.json()["key"]
        keys = NodeKeys.generate()
        async with ControlClient("http://c", keys, None, transport=transport) as c:
            enrolled = await c.register("laptop", auth_key=key)
        assert isinstance(enrolled, Enrollment)  # positive control: the key worked and was audited as used
        # the attacker: a guessed key with the real one's prefix, and one hidden in the hostname
        guess = key[: len(key) - 4] + "AAAA"
        async with ControlClient("http://c", NodeKeys.generate(), None, transport=transport) as c:
            with pytest.raises(ControlError):
                await c.register("box", auth_key=guess)
        async with ControlClient("http://c", NodeKeys.generate(), None, transport=transport) as c:
            assert isinstance(await c.register(key, auth_key=None), PendingApproval)
        trail = (await admin.get("/admin/audit")).json()
    actions = {r["action"] for r in trail}
    assert {"key.created", "key.used", "node.enrolled", "enrollment.requested"} <= actions
    datagrams = receive_all(receiver[0])
    assert len(datagrams) == len(trail)
    exported = (tmp_path / "audit.jsonl").read_text() + json.dumps(datagrams)
    async with core.read() as s:
        rows = (await s.execute(text("SELECT actor, action, object, details FROM audit"))).all()
    stored = json.dumps([list(r) for r in rows])
    secret_part = key.split("-", 1)[1]
    privates = (b64encode(keys.wg_private), b64encode(keys.node_private), keys.wg_private.hex())
    for where, blob in (("export", exported), ("database", stored)):
        assert secret_part.lower() not in blob.lower(), f"the pre-auth key is in the {where}"
        assert secret_part[-12:].lower() not in blob.lower(), f"part of the pre-auth key is in the {where}"
        assert guess.split("-", 1)[1][-12:] not in blob, f"a guessed key is in the {where}"
        for p in privates:
            assert p not in blob, f"a node private key is in the {where}"


async def test_a_hostile_string_cannot_forge_a_second_exported_record(
    core: Core, tmp_path: Path, receiver: tuple[socket.socket, Path]
) -> None:
    forged = (
        'x"] [meshvpn@32473 action="node.removed"]\n'
        "<110>1 2026-01-01T00:00:00Z h coordinator 1 node.removed -"
    )
    async with core.transaction() as tx:
        await tx.audit("node:x", "relay.session.close", forged, {"reason": forged, forged[:10]: 1})
    [m] = receive_all(receiver[0])
    assert m["msgid"] == "relay.session.close"
    assert m["params"]["object"] == forged and m["params"]["action"] == "relay.session.close"
    assert m["details"] == {"reason": forged, forged[:10]: 1}
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["object"] == forged
    assert parse_syslog  # the receiver's strict RFC 5424 parser (tests/coordinator) read it as one message

"""Enrollment with proof of possession, pre-auth keys, interactive approval, certificates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import httpx
import pytest

from coordinator.app import create_admin_app, create_app
from coordinator.core import Core
from coordinator.settings import Settings
from meshd.control import ControlError, Enrollment, NodeKeys, PendingApproval
from meshd.proto import cert as certfmt
from meshd.proto.encoding import b64encode
from tests.coordinator.conftest import Coord


async def test_enroll_with_key_gets_addresses_and_a_verifiable_cert(coord: Coord) -> None:
    client, e = await coord.enroll("Laptop.example.com")
    assert e.name == "laptop"
    assert e.ips[0].startswith("100.64.") and e.ips[0].endswith("/32")
    assert e.ips[1].startswith("fd") and e.ips[1].endswith("/128")
    payload = certfmt.verify(e.cert, [e.coordinator_public_key], time.time())
    assert payload.node_id == e.node_id
    assert payload.wg_public_key == b64encode(client.keys.wg_public)
    assert payload.not_after - payload.not_before >= 24 * 3600
    await client.aclose()


async def test_names_are_dns_safe_and_unique(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    names = [(await coord.enroll("web server!", key))[1].name for _ in range(3)]
    assert names == ["web-server", "web-server-1", "web-server-2"]


async def test_addresses_are_never_handed_out_twice(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    ips = [(await coord.enroll(f"n{i}", key))[1].ips for i in range(10)]
    assert len({ip for pair in ips for ip in pair}) == 20


async def test_single_use_key_redeemed_concurrently_enrolls_exactly_one(coord: Coord) -> None:
    key = await coord.user_and_key()
    clients = [coord.client() for _ in range(8)]
    results = await asyncio.gather(
        *(c.register(f"racer{i}", auth_key=key) for i, c in enumerate(clients)), return_exceptions=True
    )
    enrolled = [r for r in results if isinstance(r, Enrollment)]
    refused = [r for r in results if isinstance(r, ControlError)]
    assert len(enrolled) == 1
    assert len(refused) == 7 and all(r.status == 403 for r in refused)
    assert len((await coord.admin.get("/admin/nodes")).json()) == 1


async def test_expired_and_unknown_keys_are_refused(coord: Coord) -> None:
    key = await coord.user_and_key(expiration=0.2)
    await asyncio.sleep(0.3)  # part of the spec, not synchronisation: wait out the key's real lifetime
    for k, reason in ((key, "expired"), ("meshkey-nope", "unknown")):
        try:
            await coord.client().register("x", auth_key=k)
        except ControlError as exc:
            assert exc.status == 403 and reason in str(exc)
        else:
            raise AssertionError("enrolled with a bad key")


async def test_interactive_enrollment_approved_by_code(coord: Coord) -> None:
    client = coord.client()
    pending = await client.register("desk")
    assert isinstance(pending, PendingApproval)
    assert len(pending.code) == 9 and pending.code[4] == "-"
    assert isinstance(await client.enrollment_status(pending.code), PendingApproval)
    r = await coord.admin.post("/admin/approve", json={"code": pending.code.lower()})
    assert r.status_code == 200, r.text
    e = await client.wait_for_approval(pending.code, poll=0.05, within=5)
    assert e.name == "desk" and client.node_id == e.node_id
    r = await coord.admin.post("/admin/approve", json={"code": pending.code})
    assert r.status_code == 409


async def test_status_poll_must_be_signed_by_the_waiting_node(coord: Coord) -> None:
    pending = await coord.client().register("desk")
    assert isinstance(pending, PendingApproval)
    intruder = coord.client(NodeKeys.generate())
    try:
        await intruder.enrollment_status(pending.code)
    except ControlError as exc:
        assert exc.status == 401
    else:
        raise AssertionError("status served to another key")


async def test_cert_renewal_and_revocation(coord: Coord) -> None:
    client, e = await coord.enroll("renewer")
    fresh = await client.renew_cert()
    old, new = certfmt.decode(e.cert)[0], certfmt.decode(fresh)[0]
    assert new.serial > old.serial and new.not_after >= old.not_after
    assert (await coord.admin.post("/admin/nodes/renewer/expire")).status_code == 204
    try:
        await client.renew_cert()
    except ControlError as exc:
        assert exc.status == 403
    else:
        raise AssertionError("expired node renewed its certificate")


@pytest.mark.hostile
async def test_names_that_would_pass_for_someone_else_get_a_suffix(coord: Coord) -> None:
    """A node named like a user, a reserved name or the mesh domain is renamed, like a taken name."""
    key = await coord.user_and_key("alice", reusable=True)
    hostnames = ["alice", "Alice.example.com", "localhost", "WPAD", "gateway", "isatap", "mesh", "bob"]
    names = [(await coord.enroll(h, key))[1].name for h in hostnames]
    assert names == ["alice-1", "alice-2", "localhost-1", "wpad-1", "gateway-1", "isatap-1", "mesh-1", "bob"]
    r = await coord.admin.post("/admin/nodes/bob/rename", json={"new_name": "localhost"})
    assert r.status_code == 400 and "reserved" in r.text


@asynccontextmanager
async def restarted(settings: Settings) -> AsyncIterator[Coord]:
    """The coordinator started again on the same database: a fresh address pool, its cursor at the start."""
    core = Core(settings)
    await core.start()
    try:
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(settings, core=core)), base_url="http://c"
            ) as api,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_admin_app(core)), base_url="http://a"
            ) as admin,
        ):
            yield Coord(core, api, admin, httpx.ASGITransport(app=create_app(settings, core=core)))
    finally:
        await core.stop()


@pytest.mark.hostile
async def test_names_a_new_node_inherits_no_removed_nodes_name_or_address(
    coord: Coord, settings: Settings
) -> None:
    """Hostile: policy rules, firewall rules and peers' hosts files may still name a removed node by its name
    or address; a node enrolled within the quarantine (24 h) gets neither, even after a restart."""
    key = await coord.user_and_key(reusable=True)
    for i in range(4):
        await coord.enroll(f"n{i}", key)
    _, gone = await coord.enroll("alice-laptop", key)
    assert gone.ips[0] == "100.64.0.5/32"
    assert (await coord.admin.delete("/admin/nodes/alice-laptop")).status_code == 204
    removed = [a for a in (await coord.admin.get("/admin/audit")).json() if a["action"] == "node.removed"]
    assert removed[-1]["details"]["quarantine_until"] > time.time() + 23 * 3600

    async with restarted(settings) as again:  # the pool's cursor starts at the lowest free address again
        _, new = await again.enroll("alice-laptop", key)
        assert new.name == "alice-laptop-1" and new.ips[0] == "100.64.0.6/32"
        assert gone.ips[1] not in new.ips
        # a renamed node's old name is held the same way
        assert (
            await again.admin.post("/admin/nodes/n0/rename", json={"new_name": "n0-old"})
        ).status_code == 204
        assert (await again.enroll("n0", key))[1].name == "n0-1"
        # the admin says so: the quarantine ends (a name that is no longer a node, with --release)
        assert (await again.admin.delete("/admin/nodes/alice-laptop?release=true")).status_code == 204
        assert (await again.admin.delete("/admin/nodes/nobody?release=true")).status_code == 404
    async with restarted(settings) as third:
        _, back = await third.enroll("alice-laptop", key)
        assert back.name == "alice-laptop" and back.ips[0] == "100.64.0.5/32"
        # removed with --release: name and address are free at once
        assert (await third.admin.delete("/admin/nodes/n1?release=true")).status_code == 204
        assert (await third.enroll("n1", key))[1].name == "n1"


async def test_names_the_quarantine_ends_by_itself(settings: Settings) -> None:
    async with restarted(replace(settings, quarantine=0.3)) as c:
        key = await c.user_and_key(reusable=True)
        await c.enroll("short", key)
        assert (await c.admin.delete("/admin/nodes/short")).status_code == 204
        assert (await c.enroll("short", key))[1].name == "short-1"
        await asyncio.sleep(0.4)  # part of the spec, not synchronisation: wait out the quarantine
        assert (await c.enroll("short", key))[1].name == "short"

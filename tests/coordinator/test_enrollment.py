"""Enrollment with proof of possession, pre-auth keys, interactive approval, certificates."""

from __future__ import annotations

import asyncio
import time

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

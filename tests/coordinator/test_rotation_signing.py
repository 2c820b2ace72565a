"""Signing key rotation: new active key endorsed by the old one, overlap, every certificate re-issued."""

from __future__ import annotations

import time

from meshd.proto import cert as certfmt
from meshd.proto import trust
from tests.coordinator.conftest import Coord
from tests.coordinator.test_stream import enroll_live, wait_until


async def test_rotation_reissues_every_cert_and_keeps_the_old_key_for_the_overlap(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    a, ea = await coord.enroll("a", key)
    _b, _ = await coord.enroll("b", key)
    old = coord.core.keys.active_public
    r = await coord.admin.post("/admin/signing-key/rotate", json={"overlap": 3600})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["reissued"] == 2 and doc["previous_key_id"] == certfmt.key_id(old) != doc["key_id"]
    new = coord.core.keys.active_public
    assert coord.core.keys.trusted == (new, old), "active first, the old key during the overlap"
    for node in (await coord.admin.get("/admin/nodes")).json():
        assert node["cert_not_after"] is not None
    for p in coord.core.state.peers.values():
        assert certfmt.verify(p.cert, [new], time.time()).issuer == doc["key_id"]
    assert certfmt.verify(ea.cert, coord.core.keys.trusted, time.time()), "old certs still verify"
    # a node that trusted only the old key accepts the new one through the endorsement
    announced = await a.signing_keys()
    assert trust.accept((old,), announced) == (new, old)
    assert trust.accept((b"\x01" * 32,), announced) == (b"\x01" * 32,), "no trust from nowhere"
    actions = [x["action"] for x in (await coord.admin.get("/admin/audit")).json()]
    assert "signing_key.rotated" in actions
    await a.aclose()
    await _b.aclose()


async def test_the_old_key_is_dropped_after_the_overlap_and_a_second_rotation_chains(coord: Coord) -> None:
    first = coord.core.keys.active_public
    assert (await coord.admin.post("/admin/signing-key/rotate", json={"overlap": 0})).status_code == 200
    second = coord.core.keys.active_public
    assert first not in coord.core.keys.trusted
    assert (await coord.admin.post("/admin/signing-key/rotate", json={})).status_code == 200
    third = coord.core.keys.active_public
    assert coord.core.keys.trusted == (third, second)
    announced = coord.core.keys.announced()
    assert trust.accept((second,), announced) == (third, second)
    assert (await coord.admin.post("/admin/signing-key/rotate", json={"overlap": -1})).status_code == 422


async def test_nodes_get_the_reissued_certs_through_the_stream(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    async with b.stream() as sb:
        await sb.next_map(within=5)
        r = await live.admin.post("/admin/signing-key/rotate", json={})
        new_id = r.json()["key_id"]
        m = await wait_until(
            sb,
            lambda m: all(certfmt.decode(p.cert)[0].issuer == new_id for p in (*m.peers, m.self_node)),
            2.0,
        )
        assert m.peers
    await a.aclose()
    await b.aclose()

"""WireGuard key rotation: proof of possession of the new key, re-issued certificate, peers told, audit."""

from __future__ import annotations

import json
import time

import pytest
from nacl.public import Box, PrivateKey, PublicKey

from meshd.control import ControlClient, ControlError
from meshd.proto import cert as certfmt
from meshd.proto.encoding import b64decode, b64encode
from tests.coordinator.conftest import Coord
from tests.coordinator.test_stream import enroll_live, wait_until


async def _challenge(coord: Coord) -> tuple[str, bytes]:
    ch = (await coord.api.post("/api/v1/register/challenge")).json()
    return ch["challenge"], b64decode(ch["server_ephemeral_x25519_pub"])


async def _rotate(client: ControlClient, body: dict[str, str]) -> None:
    await client._request("POST", "/api/v1/keys/rotate", body, signer=client._need_id())


def _body(
    new: PrivateKey, challenge: str, server: bytes, boxed_by: PrivateKey | None = None
) -> dict[str, str]:
    box = Box(boxed_by or new, PublicKey(server)).encrypt(b64decode(challenge))
    return {
        "wg_public_key": b64encode(bytes(new.public_key)),
        "challenge": challenge,
        "box": b64encode(bytes(box)),
    }


async def test_rotation_stores_the_key_reissues_the_cert_and_is_audited(coord: Coord) -> None:
    client, e = await coord.enroll("laptop")
    old = b64encode(client.keys.wg_public)
    new = PrivateKey.generate()
    cert = await client.rotate_key(bytes(new))
    payload = certfmt.verify(cert, [e.coordinator_public_key], time.time())
    assert payload.wg_public_key == b64encode(bytes(new.public_key)) != old
    assert payload.serial > certfmt.decode(e.cert)[0].serial
    [node] = (await coord.admin.get("/admin/nodes")).json()
    assert node["wg_public_key"] == b64encode(bytes(new.public_key))
    records = (await coord.admin.get("/admin/audit")).json()
    [rotated] = [r for r in records if r["action"] == "node.key_rotated"]
    assert rotated["details"]["old_wg_public_key"] == old
    assert rotated["details"]["wg_public_key"] == b64encode(bytes(new.public_key))
    assert b64encode(bytes(new)) not in json.dumps(records), "no private key in the audit trail"
    await client.aclose()


async def test_a_box_made_with_another_key_is_refused(coord: Coord) -> None:
    client, _ = await coord.enroll("laptop")
    challenge, server = await _challenge(coord)
    body = _body(PrivateKey.generate(), challenge, server, boxed_by=PrivateKey.generate())
    with pytest.raises(ControlError) as err:
        await _rotate(client, body)
    assert err.value.status == 401 and "proof" in str(err.value)
    [node] = (await coord.admin.get("/admin/nodes")).json()
    assert node["wg_public_key"] == b64encode(client.keys.wg_public), "the key did not change"
    await client.aclose()


async def test_a_challenge_works_once(coord: Coord) -> None:
    client, _ = await coord.enroll("laptop")
    challenge, server = await _challenge(coord)
    await _rotate(client, _body(PrivateKey.generate(), challenge, server))
    with pytest.raises(ControlError) as err:
        await _rotate(client, _body(PrivateKey.generate(), challenge, server))
    assert err.value.status == 401 and "challenge" in str(err.value)
    await client.aclose()


async def test_unsigned_or_malformed_requests_are_4xx(coord: Coord) -> None:
    client, _ = await coord.enroll("laptop")
    challenge, server = await _challenge(coord)
    body = _body(PrivateKey.generate(), challenge, server)
    r = await coord.api.post("/api/v1/keys/rotate", json=body)
    assert r.status_code == 401, "only the node (its node key) may rotate its WireGuard key"
    for bad in ({**body, "wg_public_key": "nope"}, {**body, "box": "!"}, {"wg_public_key": "x"}):
        with pytest.raises(ControlError) as err:
            await _rotate(client, bad)
        assert 400 <= err.value.status < 500
    await client.aclose()


async def test_another_nodes_key_or_the_same_key_conflicts(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    a, _ = await coord.enroll("a", key)
    b, _ = await coord.enroll("b", key)
    for taken in (a.keys.wg_private, b.keys.wg_private):
        with pytest.raises(ControlError) as err:
            await a.rotate_key(taken)
        assert err.value.status == 409
    await a.aclose()
    await b.aclose()


async def test_peers_get_the_new_key_through_the_stream_within_one_second(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    new = PrivateKey.generate()
    new_pub = b64encode(bytes(new.public_key))
    async with b.stream() as sb:
        await sb.next_map(within=5)
        t0 = time.monotonic()
        await a.rotate_key(bytes(new))
        m = await wait_until(sb, lambda m: [p.wg_public_key for p in m.peers] == [new_pub], within=1.0)
        assert time.monotonic() - t0 < 1.0
        [peer] = m.peers
        assert certfmt.decode(peer.cert)[0].wg_public_key == new_pub
    await a.aclose()
    await b.aclose()

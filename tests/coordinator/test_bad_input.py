"""Malformed, oversized, mistyped, forged, replayed and stale requests get a 4xx, never a 500."""

from __future__ import annotations

import json
import time

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.proto import signing
from tests.coordinator.conftest import Coord


def signed(
    client_keys: bytes,
    node: str,
    method: str,
    target: str,
    body: bytes,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    return signing.sign_request(client_keys, node, method, target, body, now or time.time(), nonce)


async def test_malformed_and_oversized_json(coord: Coord) -> None:
    r = await coord.api.post(
        "/api/v1/register", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "invalid request" in r.json()["detail"]
    r = await coord.api.post("/api/v1/register", content=b"x" * (65 * 1024))
    assert r.status_code == 413
    r = await coord.api.post(
        "/api/v1/register",
        json={
            "hostname": 5,
            "wg_public_key": [],
            "node_public_key": "",
            "challenge": "",
            "signature": "",
            "box": "",
        },
    )
    assert r.status_code == 422
    r = await coord.api.post(
        "/api/v1/register",
        json={
            "hostname": "a",
            "wg_public_key": "AAAA",
            "node_public_key": "AAAA",
            "challenge": "AAAA",
            "signature": "AAAA",
            "box": "AAAA",
        },
    )
    assert r.status_code == 400 and "32 bytes" in r.json()["detail"]
    assert (await coord.admin.post("/admin/users", json={"name": ["x"]})).status_code == 422
    assert (await coord.admin.post("/admin/keys", json={"user": "ghost"})).status_code == 404
    assert (await coord.admin.post("/admin/keys", json={"user": "x", "expiration": "1h"})).status_code == 422


async def test_enrollment_proofs_must_hold(coord: Coord) -> None:
    from meshd.control import NodeKeys
    from meshd.proto.encoding import b64encode

    key = await coord.user_and_key(reusable=True)
    keys, other = NodeKeys.generate(), NodeKeys.generate()
    ch = (await coord.api.post("/api/v1/register/challenge")).json()
    from nacl.public import Box, PrivateKey, PublicKey

    from meshd.proto.encoding import b64decode

    challenge = b64decode(ch["challenge"])
    server = PublicKey(b64decode(ch["server_ephemeral_x25519_pub"]))
    good_box = b64encode(bytes(Box(PrivateKey(keys.wg_private), server).encrypt(challenge)))
    wrong_box = b64encode(bytes(Box(PrivateKey(other.wg_private), server).encrypt(challenge)))
    sig = signing.sign_enrollment(keys.node_private, challenge, keys.wg_public, keys.node_public, "h")
    bad_sig = signing.sign_enrollment(other.node_private, challenge, keys.wg_public, keys.node_public, "h")
    base = {
        "hostname": "h",
        "wg_public_key": b64encode(keys.wg_public),
        "auth_key": key,
        "node_public_key": b64encode(keys.node_public),
        "challenge": ch["challenge"],
    }
    r = await coord.api.post(
        "/api/v1/register", json={**base, "signature": b64encode(bad_sig), "box": good_box}
    )
    assert r.status_code == 401 and "signature" in r.json()["detail"]
    r = await coord.api.post("/api/v1/register", json={**base, "signature": b64encode(sig), "box": wrong_box})
    assert r.status_code == 401 and "WireGuard" in r.json()["detail"]
    r = await coord.api.post("/api/v1/register", json={**base, "signature": b64encode(sig), "box": good_box})
    assert r.status_code == 200
    r = await coord.api.post("/api/v1/register", json={**base, "signature": b64encode(sig), "box": good_box})
    assert r.status_code == 401 and "challenge" in r.json()["detail"]
    assert "private" not in json.dumps(r.json())


async def test_signed_requests_reject_forgery_replay_staleness_and_unknown_nodes(coord: Coord) -> None:
    client, e = await coord.enroll("n1")
    node = str(e.node_id)
    path = "/api/v1/cert/renew"
    h = signed(client.keys.node_private, node, "POST", path, b"")
    assert (await coord.api.post(path, headers=h)).status_code == 200
    r = await coord.api.post(path, headers=h)
    assert r.status_code == 401 and "replayed" in r.json()["detail"]
    stale = signed(client.keys.node_private, node, "POST", path, b"", now=time.time() - 120)
    r = await coord.api.post(path, headers=stale)
    assert r.status_code == 401 and "stale" in r.json()["detail"]
    forged = signed(b"\x01" * 32, node, "POST", path, b"")
    assert (await coord.api.post(path, headers=forged)).status_code == 401
    other_path = signed(client.keys.node_private, node, "POST", "/api/v1/map", b"")
    assert (await coord.api.post(path, headers=other_path)).status_code == 401
    unknown = signed(client.keys.node_private, "987654", "POST", path, b"")
    r = await coord.api.post(path, headers=unknown)
    assert r.status_code == 401 and "unknown node" in r.json()["detail"]
    assert (await coord.api.post(path)).status_code == 401
    assert (await coord.api.post(path, headers={**h, "x-mesh-timestamp": "soon"})).status_code == 401
    assert (await coord.api.get("/admin/users")).status_code == 404, (
        "admin API must not be on the node listener"
    )


header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=100)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    node=header_values, ts=header_values, nonce=header_values, sig=header_values, body=st.binary(max_size=300)
)
async def test_any_signature_envelope_gets_4xx(
    coord: Coord, node: str, ts: str, nonce: str, sig: str, body: bytes
) -> None:
    headers = {"x-mesh-node": node, "x-mesh-timestamp": ts, "x-mesh-nonce": nonce, "x-mesh-signature": sig}
    r = await coord.api.post("/api/v1/cert/renew", headers=headers, content=body)
    assert 400 <= r.status_code < 500


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=15), inner, max_size=6),
    max_leaves=20,
)
register_like = st.fixed_dictionaries(
    {},
    optional={
        k: json_values | st.text(max_size=80)
        for k in ("hostname", "wg_public_key", "node_public_key", "auth_key", "challenge", "signature", "box")
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=register_like | json_values,
    path=st.sampled_from(
        ["/api/v1/register", "/api/v1/register/challenge", "/api/v1/messages", "/api/v1/cert/renew"]
    ),
)
async def test_any_json_body_gets_a_4xx_or_success_never_500(coord: Coord, body: object, path: str) -> None:
    r = await coord.api.post(
        path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    assert r.status_code < 500, r.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(
        st.sampled_from(["name", "user", "reusable", "expiration", "tags", "code", "new_name", "policy"]),
        json_values,
        max_size=5,
    ),
    path=st.sampled_from(["/admin/users", "/admin/keys", "/admin/approve", "/admin/nodes/x/rename"]),
)
async def test_any_admin_body_gets_4xx_or_success(coord: Coord, body: object, path: str) -> None:
    r = await coord.admin.post(path, json=body)
    assert r.status_code < 500, r.text


async def test_a_garbage_stream_message_is_answered_not_fatal(coord: Coord) -> None:
    client, e = await coord.enroll("n1")
    for payload in (
        b"{",
        b"[]",
        b'{"type":"endpoints","candidates":"x"}',
        b'{"type":"signal","to":"a"}',
        b'{"type":"nope"}',
    ):
        h = signed(client.keys.node_private, str(e.node_id), "POST", "/api/v1/messages", payload)
        r = await coord.api.post("/api/v1/messages", headers=h, content=payload)
        assert r.status_code == 400, (payload, r.text)
    assert isinstance(coord.api, httpx.AsyncClient)

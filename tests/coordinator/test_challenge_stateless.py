"""Stateless enrollment challenges through the API (issue 16): a challenge is no database row until it
is used; it opens only on the coordinator that made it (or a replica sharing its signing key), once, and
before its expiry. A challenge row left by an older coordinator (the minute before an upgrade) still works
once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from nacl.public import Box, PrivateKey, PublicKey
from sqlalchemy import func, select

from coordinator import challenges
from coordinator.core import Core
from coordinator.db.models import Challenge
from coordinator.settings import Settings
from meshd.control import NodeKeys
from meshd.proto import signing
from meshd.proto.encoding import b64decode, b64encode
from tests.coordinator.conftest import Coord, coord, core, db_url, pg_socket, settings  # noqa: F401 - fixtures


def _body(key: str, challenge: bytes, server: bytes, hostname: str = "h") -> dict[str, object]:
    keys = NodeKeys.generate()
    box = Box(PrivateKey(keys.wg_private), PublicKey(server)).encrypt(challenge)
    sig = signing.sign_enrollment(keys.node_private, challenge, keys.wg_public, keys.node_public, hostname)
    return {
        "hostname": hostname,
        "wg_public_key": b64encode(keys.wg_public),
        "node_public_key": b64encode(keys.node_public),
        "auth_key": key,
        "challenge": b64encode(challenge),
        "signature": b64encode(sig),
        "box": b64encode(bytes(box)),
    }


async def _rows(c: Coord) -> int:
    async with c.core.read() as s:
        return int((await s.execute(select(func.count()).select_from(Challenge))).scalar_one())


async def test_a_challenge_is_stored_only_when_used_and_then_only_once(coord: Coord) -> None:  # noqa: F811
    key = await coord.user_and_key(reusable=True)
    ch = (await coord.api.post("/api/v1/register/challenge")).json()
    assert await _rows(coord) == 0  # issuing wrote nothing
    challenge, server = b64decode(ch["challenge"], length=32), b64decode(ch["server_ephemeral_x25519_pub"])
    assert ch["expires_at"] >= time.time() + coord.core.settings.challenge_lifetime - 1
    r = await coord.api.post("/api/v1/register", json=_body(key, challenge, server, "first"))
    assert r.status_code == 200, r.text
    assert await _rows(coord) == 1  # the used marker
    # the same challenge again, for another node key: refused (single use)
    r = await coord.api.post("/api/v1/register", json=_body(key, challenge, server, "second"))
    assert r.status_code == 401 and "already used" in r.json()["detail"]


async def test_a_challenge_made_with_another_coordinators_key_is_refused(coord: Coord) -> None:  # noqa: F811
    key = await coord.user_and_key(reusable=True)
    other_key = challenges.derive_key(b"x" * 32)
    challenge, ephemeral, _ = challenges.issue(other_key, 60)
    body = _body(key, challenge, bytes(ephemeral.public_key))
    r = await coord.api.post("/api/v1/register", json=body)
    assert r.status_code == 401 and "unknown" in r.json()["detail"]
    assert await _rows(coord) == 0


async def test_an_expired_challenge_is_refused_before_any_database_work(coord: Coord) -> None:  # noqa: F811
    key = await coord.user_and_key(reusable=True)
    mine = challenges.keys_of(coord.core).current(coord.core.keys.active_seed)
    challenge, ephemeral, _ = challenges.issue(mine, 60, now=time.time() - 120)  # expired a minute ago
    r = await coord.api.post("/api/v1/register", json=_body(key, challenge, bytes(ephemeral.public_key)))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    assert await _rows(coord) == 0


async def test_a_legacy_challenge_row_is_accepted_once(coord: Coord) -> None:  # noqa: F811
    key = await coord.user_and_key(reusable=True)
    challenge, ephemeral = b"L" * 32, PrivateKey.generate()
    async with coord.core.transaction() as tx:
        tx.session.add(
            Challenge(
                challenge=challenges.Opened(challenge, 0, ephemeral).id,
                ephemeral_private=b64encode(bytes(ephemeral)),
                expires_at=time.time() + 60,
            )
        )
    server = bytes(ephemeral.public_key)
    r = await coord.api.post("/api/v1/register", json=_body(key, challenge, server, "legacy"))
    assert r.status_code == 200, r.text
    r = await coord.api.post("/api/v1/register", json=_body(key, challenge, server, "again"))
    assert r.status_code == 401 and "already used" in r.json()["detail"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_used_challenge_stays_used_across_a_restart(settings: Settings, tmp_path: Path) -> None:  # noqa: F811
    from coordinator import enrollment

    first = Core(settings)
    await first.start()
    try:
        issued = await enrollment.issue_challenge(first)
        challenge = b64decode(issued.challenge)
        opened = enrollment.open_challenge(first, challenge, time.time())
        assert opened is not None
        async with first.transaction() as tx:
            assert await challenges.mark_used(tx.session, opened)
    finally:
        await first.stop()
    second = Core(settings)  # same state dir: same signing key, same challenge key
    await second.start()
    try:
        again = enrollment.open_challenge(second, challenge, time.time())
        assert again is not None and again.id == opened.id
        async with second.transaction() as tx:
            assert not await challenges.mark_used(tx.session, again)
    finally:
        await second.stop()


async def test_one_challenge_raced_by_many_registrations_enrolls_one_node(coord: Coord) -> None:  # noqa: F811
    """The same challenge in many registrations at once (a replay race; they share group-commit
    transactions, where the used markers are inserted for the whole group at once): exactly one wins."""
    import asyncio

    from coordinator import groupcommit
    from coordinator.db.models import Node

    key = await coord.user_and_key(reusable=True)
    ch = (await coord.api.post("/api/v1/register/challenge")).json()
    challenge, server = b64decode(ch["challenge"]), b64decode(ch["server_ephemeral_x25519_pub"])
    bodies = [_body(key, challenge, server, f"racer{i}") for i in range(8)]
    answers = await asyncio.gather(*(coord.api.post("/api/v1/register", json=b) for b in bodies))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [401] * 7, [r.text for r in answers]
    assert all("already used" in r.json()["detail"] for r in answers if r.status_code == 401)
    async with coord.core.read() as s:
        assert int((await s.execute(select(func.count()).select_from(Node))).scalar_one()) == 1
    assert groupcommit.of(coord.core).failed > 0  # they did share a transaction

"""meshd.credentials: renewal saves before use and never dies silently; rotation order; one error type."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from meshd import credentials as creds_mod
from meshd.control import ControlError, Enrollment
from meshd.credentials import CredentialError, Credentials
from meshd.proto import cert, netmap
from meshd.proto.encoding import b64encode
from meshd.state import StateDir
from meshd.supervise import supervise
from tests.eventually import eventually_async

COORD = SigningKey.generate()
COORD_PUB = bytes(COORD.verify_key)


def issue(serial: int, wg_pub: bytes, lifetime: int = 3, start: float | None = None) -> str:
    now = int(time.time() if start is None else start)
    return cert.issue(
        cert.CertPayload(
            version=1,
            serial=serial,
            name="a",
            node_id=1,
            ips=("100.64.0.1/32",),
            wg_public_key=b64encode(wg_pub),
            node_public_key=b64encode(b"n" * 32),
            tags=(),
            not_before=now - 1,
            not_after=now + lifetime,
            issuer=cert.key_id(COORD_PUB),
        ),
        bytes(COORD),
    )


class Crash(BaseException):
    """meshd dies here (power cut, kill -9): nothing after it runs, no handler catches it."""


class FakeClient:
    def __init__(self) -> None:
        self.renewals = 0
        self.refuse_rotation = False
        self.keys = None
        self.known_wg: bytes | None = None  #: the WireGuard public key the coordinator has for us
        self.crash: str | None = None  #: "before" or "after" the coordinator takes a rotated key
        self.no_answer = False  #: the coordinator takes the key but the answer is lost

    async def fetch_map(self) -> netmap.MapMessage:
        known = self.known_wg or self.wg_pub  # type: ignore[attr-defined]
        me = netmap.Peer(
            1, "a", ("100.64.0.1/32",), b64encode(known), b64encode(b"n" * 32), issue(50, known, 600)
        )
        return netmap.MapMessage(netmap.NetMap(7, me, (), (), "", "mesh"))

    async def renew_cert(self) -> str:
        self.renewals += 1
        return issue(self.renewals + 1, self.wg_pub, lifetime=600)

    async def rotate_key(self, new_private: bytes) -> str:
        if self.refuse_rotation:
            raise ControlError("coordinator said 409: busy", 409)
        from nacl.public import PrivateKey

        if self.crash == "before":
            raise Crash()
        self.known_wg = bytes(PrivateKey(new_private).public_key)
        if self.crash == "after":
            raise Crash()
        if self.no_answer:
            raise ControlError("cannot reach the coordinator: timed out", 0)
        return issue(99, self.known_wg, lifetime=600)


def make(tmp_path: Path, lifetime: int = 3) -> tuple[Credentials, FakeClient, StateDir]:
    store = StateDir(tmp_path / "state")
    state = store.load_or_create()
    enrollment = Enrollment(1, "a", ("100.64.0.1/32",), issue(1, state.keys.wg_public, lifetime), COORD_PUB,
                            (COORD_PUB,), "mesh", "100.64.0.0/10", "fd7a::/48")  # fmt: skip
    state = state.with_enrollment("http://coord:8080", enrollment)
    store.save(state)
    client = FakeClient()
    client.wg_pub = state.keys.wg_public  # type: ignore[attr-defined]
    return Credentials(store, state, client, clock=time.time), client, store  # type: ignore[arg-type]


async def test_renewal_is_saved_before_it_is_used(tmp_path: Path) -> None:
    c, _, store = make(tmp_path, lifetime=3)  # renew at 2/3 of 4 s: after about 1.7 s
    task = asyncio.create_task(c.renew_loop(lambda: None))
    try:
        await eventually_async(lambda: cert.decode(c.enrollment.cert)[0].serial == 2, within=5.0)
    finally:
        task.cancel()
    saved = store.load()
    assert saved is not None and saved.enrollment is not None
    assert saved.enrollment.cert == c.enrollment.cert


async def test_a_full_disk_during_renewal_is_not_the_end_of_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop raises, the supervisor logs it and restarts it; the old certificate stays in use."""
    c, client, store = make(tmp_path, lifetime=0)  # due at once
    failures = 0
    real_save = store.save

    def save(state: object) -> None:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise OSError(28, "No space left on device")
        real_save(state)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "save", save)
    old = c.enrollment.cert
    task = asyncio.create_task(supervise("renew", lambda: c.renew_loop(lambda: None), backoff_min=0.05))
    try:
        await eventually_async(lambda: c.enrollment.cert != old, within=10.0)
    finally:
        task.cancel()
    assert failures == 2 and client.renewals >= 3
    saved = store.load()
    assert saved is not None and saved.enrollment is not None and saved.enrollment.cert == c.enrollment.cert


async def test_rotation_saves_the_new_key_then_hands_it_over(tmp_path: Path) -> None:
    c, _, store = make(tmp_path, lifetime=600)
    handed: list[bytes] = []

    async def on_rekey() -> None:
        saved = store.load()
        assert saved is not None and saved.keys.wg_public == c.keys.wg_public  # saved first
        handed.append(c.keys.wg_public)

    c.on_rekey = on_rekey
    old_pub = c.wg_public_b64
    old, new = await c.rotate_keys(tmp_path / "state")
    assert old == old_pub and new == c.wg_public_b64 != old
    assert handed == [c.keys.wg_public]
    assert cert.decode(c.enrollment.cert)[0].wg_public_key == new


async def test_a_refused_rotation_keeps_the_old_key_and_says_why(tmp_path: Path) -> None:
    c, client, store = make(tmp_path, lifetime=600)
    client.refuse_rotation = True
    before = c.keys
    with pytest.raises(CredentialError, match="key rotation failed: coordinator said 409"):
        await c.rotate_keys(tmp_path / "state")
    saved = store.load()
    assert c.keys == before and saved is not None and saved.keys == before


def test_enrollment_hints() -> None:
    assert "fresh key" in creds_mod.enrollment_hint(ControlError("no", 401))
    assert "coordinator serve" in creds_mod.enrollment_hint(ControlError("down", 0))
    assert creds_mod.enrollment_hint(ControlError("x", 500)) == ""


def restart(store: StateDir, client: FakeClient) -> Credentials:
    """The next start of meshd: a fresh Credentials from what is on disk, the same coordinator."""
    state = store.load()
    assert state is not None
    return Credentials(store, state, client, clock=time.time)  # type: ignore[arg-type]


@pytest.mark.hostile
async def test_a_crash_after_the_coordinator_took_the_new_key_recovers_with_the_new_key(
    tmp_path: Path,
) -> None:
    c, client, store = make(tmp_path, lifetime=600)
    old_pub = c.keys.wg_public
    client.crash = "after"
    with pytest.raises(Crash):
        await c.rotate_keys(tmp_path / "state")
    assert client.known_wg is not None and client.known_wg != old_pub  # the coordinator has the new key only
    again = restart(store, client)
    assert again.keys.wg_public == old_pub and again.state.pending_wg_private is not None
    rekeyed: list[bytes] = []

    async def on_rekey() -> None:
        rekeyed.append(again.keys.wg_public)

    again.on_rekey = on_rekey
    await again.learn_signing_keys((await client.fetch_map()).map)  # the first map after the start
    assert again.keys.wg_public == client.known_wg, "meshd kept a key the coordinator no longer knows"
    assert rekeyed == [client.known_wg]  # WireGuard and the relay took it
    saved = store.load()
    assert saved is not None and saved.keys.wg_public == client.known_wg and saved.pending_wg_private is None
    assert cert.decode(again.enrollment.cert)[0].wg_public_key == b64encode(client.known_wg)


async def test_a_crash_before_the_coordinator_took_the_new_key_keeps_the_old_key(tmp_path: Path) -> None:
    c, client, store = make(tmp_path, lifetime=600)
    before = c.keys
    client.crash = "before"
    with pytest.raises(Crash):
        await c.rotate_keys(tmp_path / "state")
    again = restart(store, client)
    assert again.state.pending_wg_private is not None
    await again.recover_pending_key()  # the explicit way (also done by the next rotation)
    assert again.keys == before and again.state.pending_wg_private is None
    saved = store.load()
    assert saved is not None and saved.keys == before and saved.pending_wg_private is None


async def test_a_lost_answer_leaves_the_key_pending_and_the_next_map_settles_it(tmp_path: Path) -> None:
    c, client, _ = make(tmp_path, lifetime=600)
    client.no_answer = True
    with pytest.raises(CredentialError, match="stays pending"):
        await c.rotate_keys(tmp_path / "state")
    assert c.state.pending_wg_private is not None and c.keys.wg_public != client.known_wg
    client.no_answer = False
    await c.learn_signing_keys((await client.fetch_map()).map)
    assert c.keys.wg_public == client.known_wg and c.state.pending_wg_private is None
    adopted = client.known_wg
    old, new = await c.rotate_keys(tmp_path / "state")  # and rotation works on from there
    assert old == b64encode(adopted) and new == b64encode(client.known_wg) == c.wg_public_b64 != old

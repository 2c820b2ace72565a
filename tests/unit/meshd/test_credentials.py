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
from meshd.proto import cert
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


class FakeClient:
    def __init__(self) -> None:
        self.renewals = 0
        self.refuse_rotation = False
        self.keys = None

    async def renew_cert(self) -> str:
        self.renewals += 1
        return issue(self.renewals + 1, self.wg_pub, lifetime=600)

    async def rotate_key(self, new_private: bytes) -> str:
        if self.refuse_rotation:
            raise ControlError("coordinator said 409: busy", 409)
        from nacl.public import PrivateKey

        return issue(99, bytes(PrivateKey(new_private).public_key), lifetime=600)


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

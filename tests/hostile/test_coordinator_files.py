"""Hostile: a local user on the coordinator's host, which runs outside systemd with a careless umask,
reads the database or the signing key; a crash while the signing key is replaced loses it; a power cut
undoes a commit that consumed a single-use key or recorded a request nonce."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator import certs
from coordinator.core import Core
from coordinator.settings import Settings

pytestmark = pytest.mark.hostile


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_state_dir_database_and_keys_are_private_whatever_the_umask(
    tmp_path: Path, umask_000: None
) -> None:
    state = tmp_path / "state"
    core = Core(Settings(state_dir=state, listen="127.0.0.1:0"))  # default: SQLite in the state dir
    await core.start()
    try:
        async with core.transaction() as tx:  # a write, so the WAL and shared-memory files exist
            await tx.audit("test", "user.created", "alice")
    finally:
        await core.stop()
    assert _mode(state) == 0o700, f"state dir is {_mode(state):04o}"
    created = sorted(p.name for p in state.iterdir())
    assert "coordinator.db" in created and "signing_key" in created, created
    for p in state.iterdir():
        assert _mode(p) & 0o077 == 0, f"{p.name} is {_mode(p):04o}: readable by other users"
    assert _mode(state / "coordinator.db") == 0o600
    assert _mode(state / "signing_key") == 0o600


async def test_a_state_dir_left_open_by_an_older_version_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    (state / "coordinator.db").touch(mode=0o644)
    os.chmod(state / "coordinator.db", 0o644)
    core = Core(Settings(state_dir=state, listen="127.0.0.1:0"))
    await core.start()
    await core.stop()
    assert _mode(state) == 0o700 and _mode(state / "coordinator.db") == 0o600


async def _synchronous(s: AsyncSession) -> int:
    return int((await s.execute(text("PRAGMA synchronous"))).scalar_one())


async def test_sqlite_commits_are_synced_with_synchronous_full_on_every_connection(tmp_path: Path) -> None:
    """A power cut must not undo a commit that consumed a single-use pre-auth key or enrollment challenge,
    or recorded a request nonce (a replay would then pass): in WAL mode only FULL (2) syncs the WAL at
    every commit, NORMAL (1) may lose the last ones. Asked on the coordinator's own connections: the
    write transaction's, and several read sessions open at once (each a pooled connection of its own)."""
    core = Core(Settings(state_dir=tmp_path / "state", listen="127.0.0.1:0"))  # default: SQLite
    await core.start()
    try:
        async with core.transaction() as tx:
            await tx.audit("test", "user.created", "alice")  # a real write on that connection
            assert await _synchronous(tx.session) == 2
            assert (await tx.session.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"

        together = asyncio.Barrier(4)

        async def read_one() -> int:
            async with core.read() as s:
                value = await _synchronous(s)
                await together.wait()  # all four hold their connection at once: four connections
                return value

        assert await asyncio.wait_for(asyncio.gather(*(read_one() for _ in range(4))), 30) == [2, 2, 2, 2]
    finally:
        await core.stop()


def test_a_signing_key_write_cut_before_the_rename_keeps_the_old_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path.chmod(0o700)
    old = certs.load_or_create(tmp_path)
    real_replace = os.replace

    def crash_on_signing_key(src: object, dst: object, *a: object, **kw: object) -> None:
        if Path(str(dst)).name == "signing_key":
            raise OSError(5, "Input/output error (simulated crash)")
        real_replace(src, dst, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", crash_on_signing_key)
    with pytest.raises(OSError, match="simulated crash"):
        certs.rotate(tmp_path, old, overlap=60, now=1e9)
    monkeypatch.undo()
    again = certs.load_or_create(tmp_path)
    assert again.active_seed == old.active_seed  # the old key, whole
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left
    assert _mode(tmp_path / "signing_key") == 0o600


def test_the_first_signing_key_is_written_through_a_synced_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted first write leaves no (empty) signing_key that would stop every later start; a
    complete one syncs the file's data before the rename and the directory after it (else a power cut
    may keep the rename but not the data: an empty signing_key)."""
    monkeypatch.setattr(os, "replace", lambda *a, **kw: (_ for _ in ()).throw(OSError(5, "simulated crash")))
    with pytest.raises(OSError, match="simulated crash"):
        certs.load_or_create(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()

    events: list[tuple[str, str]] = []  # ("fsync", what the descriptor is) and ("replace", target), in order
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        st = os.fstat(fd)
        what = "dir" if stat.S_ISDIR(st.st_mode) else os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", what))
        real_fsync(fd)

    def spy_replace(src: object, dst: object, *a: object, **kw: object) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    assert len(certs.load_or_create(tmp_path).active_seed) == 32
    key = str(tmp_path / "signing_key")
    assert ("replace", key) in events, events
    at = events.index(("replace", key))
    before, after = events[:at], events[at + 1 :]
    # the temporary file's data is synced before it is renamed over signing_key ...
    assert any(
        kind == "fsync" and what.startswith(str(tmp_path / ".signing_key")) for kind, what in before
    ), events
    # ... and the directory (the rename itself) after
    assert ("fsync", "dir") in after, events

"""Secrets replicas share through the database, sealed with an at-rest key (coordinator/sharedsecrets.py)."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator import sharedsecrets
from coordinator.core import Core
from coordinator.db.models import SharedSecret
from coordinator.settings import Settings
from coordinator.sharedsecrets import AtRestKey, SecretsError
from tests.coordinator.test_cli import BIN, cli


def key_file(tmp_path: Path, name: str = "secrets.key") -> Path:
    path = tmp_path / name
    path.write_text(sharedsecrets.new_key_text() + "\n")
    return path


def replica(tmp_path: Path, db_url: str, name: str, key: Path | None) -> Core:
    return Core(
        Settings(
            state_dir=tmp_path / name,
            database=db_url,
            coalesce=0.02,
            listen="127.0.0.1:0",
            secrets_key_file=key,
        )
    )


def files(core: Core) -> dict[str, str]:
    d = core.settings.state_dir
    return {n: (d / f).read_text() for n, f in sharedsecrets.FILES.items() if (d / f).exists()}


# ------------------------------------------------------------------------------------------ sealing
@given(st.text(max_size=300))
def test_a_sealed_value_opens_with_its_key_and_name_only(value: str) -> None:
    key, other = AtRestKey(os.urandom(32), "a"), AtRestKey(os.urandom(32), "b")
    sealed = key.seal("signing_key", value)
    assert key.open("signing_key", sealed) == value
    # a byte or a few may turn up in ciphertext by chance; 8 or more bytes only by a leak (2^-64 a place)
    assert value.encode() not in base64.b64decode(sealed) or len(value.encode()) < 8
    with pytest.raises(SecretsError, match="does not open"):
        other.open("signing_key", sealed)
    with pytest.raises(SecretsError, match="not the secret of that name"):
        key.open("relay_secret", sealed)  # a row copied over another's name


@given(st.text(max_size=80))
def test_a_malformed_key_is_one_clear_error(text: str) -> None:
    try:
        key = sharedsecrets.parse_key(text, "$X")
    except SecretsError as exc:
        assert "\n" not in str(exc) and "32 bytes of base64" in str(exc)
    else:
        assert len(key.key) == 32


def test_the_key_comes_from_the_file_or_else_the_environment(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    env = {sharedsecrets.KEY_ENV: sharedsecrets.new_key_text()}
    from_file = sharedsecrets.key_from(path, env)
    from_env = sharedsecrets.key_from(None, env)
    assert from_file is not None and from_env is not None and from_file.id != from_env.id
    assert from_file.source == str(path) and from_env.source == "$COORDINATOR_SECRETS_KEY"
    assert sharedsecrets.key_from(None, {}) is None
    with pytest.raises(SecretsError, match="cannot read the secrets key"):
        sharedsecrets.key_from(tmp_path / "missing", env)


# ------------------------------------------------------------------------------- start, in sequence
async def run_first(tmp_path: Path, db_url: str, key: Path) -> tuple[Core, dict[str, SharedSecret]]:
    """The first replica started (it seals its secrets) and stopped; the rows it left."""
    first = replica(tmp_path, db_url, "one", key)
    await first.start()
    await first.stop()
    async with first.sessions() as s:
        return first, await sharedsecrets.read_rows(s)


async def test_the_first_replica_shares_its_secrets_and_the_next_takes_them(
    tmp_path: Path, db_url: str
) -> None:
    key = key_file(tmp_path)
    first, rows = await run_first(tmp_path, db_url, key)
    assert set(rows) == set(sharedsecrets.FILES)
    signing = (tmp_path / "one" / "signing_key").read_text().strip()
    assert all(signing not in r.sealed for r in rows.values())  # sealed at rest, not stored as text
    second = replica(tmp_path, db_url, "two", key)
    await second.start()
    try:
        assert second.keys.active_seed == first.keys.active_seed
        assert files(second)["relay_secret"] == files(first)["relay_secret"]
        assert (tmp_path / "two" / "signing_key").stat().st_mode & 0o777 == 0o600
    finally:
        await second.stop()


async def test_a_missing_wrong_or_conflicting_key_is_refused_never_replaced(
    tmp_path: Path, db_url: str
) -> None:
    key = key_file(tmp_path)
    first, rows = await run_first(tmp_path, db_url, key)
    before = {n: r.sealed for n, r in rows.items()}
    with pytest.raises(SecretsError, match="give --secrets-key-file FILE or \\$COORDINATOR_SECRETS_KEY"):
        await replica(tmp_path, db_url, "nokey", None).start()
    wrong = sharedsecrets.key_from(key_file(tmp_path, "wrong.key"))
    assert wrong is not None
    with pytest.raises(SecretsError, match=f"id {wrong.id}.* is not the one"):
        await replica(tmp_path, db_url, "wrong", tmp_path / "wrong.key").start()
    (tmp_path / "own").mkdir(mode=0o700)
    (tmp_path / "own" / "signing_key").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    with pytest.raises(SecretsError, match="is not the shared signing key"):
        await replica(tmp_path, db_url, "own", key).start()
    async with first.sessions() as s:
        after = {n: r.sealed for n, r in (await sharedsecrets.read_rows(s)).items()}
    assert after == before  # nothing made anew


async def test_an_existing_single_coordinator_keeps_its_keys_when_sharing_starts(
    tmp_path: Path, db_url: str
) -> None:
    plain = replica(tmp_path, db_url, "one", None)  # as today: files only
    await plain.start()
    await plain.stop()
    seed = plain.keys.active_seed
    shared = replica(tmp_path, db_url, "one", key_file(tmp_path))
    await shared.start()
    try:
        assert shared.keys.active_seed == seed  # nodes keep trusting the key they know
    finally:
        await shared.stop()


async def test_rekey_reseals_every_secret_with_the_new_key(tmp_path: Path, db_url: str) -> None:
    old_path, new_path = key_file(tmp_path, "old.key"), key_file(tmp_path, "new.key")
    first = replica(tmp_path, db_url, "one", old_path)
    await first.start()
    await first.stop()
    env = {**os.environ, sharedsecrets.KEY_ENV: old_path.read_text().strip()}
    state = tmp_path / "cli"
    r = await rekey(state, db_url, new_path, env)
    assert r.returncode == 0, r.stderr
    assert "re-sealed 4 shared secret(s)" in r.stdout
    with pytest.raises(SecretsError, match="is not the one"):
        await replica(tmp_path, db_url, "old", old_path).start()
    again = replica(tmp_path, db_url, "new", new_path)
    await again.start()
    try:
        assert again.keys.active_seed == first.keys.active_seed
    finally:
        await again.stop()
    # rekey with a key that does not open them: one line, non-zero, nothing changed
    r = await rekey(state, db_url, old_path, env)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "is not the one" in r.stderr, r.stderr


async def rekey(
    state: Path, db_url: str, new_key: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`coordinator secrets rekey` (the current key from `env`)."""
    args = [
        "--state-dir",
        str(state),
        "secrets",
        "rekey",
        "--database",
        db_url,
        "--new-key-file",
        str(new_key),
    ]
    return await asyncio.to_thread(
        subprocess.run, [str(BIN), *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_new_key_writes_a_private_key_file_once(tmp_path: Path) -> None:
    path = tmp_path / "k"
    r = cli(tmp_path / "state", "secrets", "new-key", str(path))
    assert r.returncode == 0, r.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(sharedsecrets.parse_key(path.read_text(), "k").key) == 32
    again = cli(tmp_path / "state", "secrets", "new-key", str(path))
    assert again.returncode != 0 and again.stderr.count("\n") == 1, again.stderr


def test_serve_with_a_malformed_key_fails_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    r = subprocess.run(
        [
            str(BIN),
            "serve",
            "--state-dir",
            str(tmp_path / "s"),
            "--listen",
            "127.0.0.1:0",
            "--secrets-key-file",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "32 bytes of base64" in r.stderr, r.stderr

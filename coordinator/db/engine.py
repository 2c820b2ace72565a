"""Engine creation (SQLite in WAL mode or PostgreSQL via asyncpg) and Alembic migrations at start."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
DB_FILE_MODE = 0o600
MIGRATION_LOCK = 0x6D657368 + 2  #: PostgreSQL advisory lock held while migrating (issue 16: replicas)


def make_engine(url: str) -> AsyncEngine:
    """An async engine for `url`; SQLite gets WAL, foreign keys and a busy timeout on every connection.

    `synchronous=FULL`: in WAL mode NORMAL may lose the last commits on power loss, and some of them
    must not be lost: a consumed single-use pre-auth key or enrollment challenge, a recorded request nonce
    (replay protection), an audit record. FULL syncs the WAL at every commit (docs/security.md has the
    measured cost on enrollment). PostgreSQL's default (synchronous_commit=on) is already durable."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20)


def sqlite_path(url: str) -> Path | None:
    """The database file of a file-backed SQLite URL, else None (PostgreSQL, `:memory:`)."""
    u = make_url(url)
    if not u.drivername.startswith("sqlite") or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def secure_sqlite_file(url: str) -> None:
    """Create the SQLite file 0600 (whatever the umask) before SQLite does, and tighten an existing one.

    SQLite creates `-wal` and `-shm` with the mode of the main file, so they follow. Left to SQLite the
    file would be 0644 minus the umask: world-readable pending approval codes, key hashes, the audit."""
    path = sqlite_path(url)
    if path is None or not path.parent.is_dir():
        return  # nothing to do, or SQLite reports the missing directory itself
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, DB_FILE_MODE)
    try:
        os.fchmod(fd, DB_FILE_MODE)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path.with_name(path.name + suffix), DB_FILE_MODE)


def _upgrade(connection: Connection) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent); a SQLite file is made private first."""
    secure_sqlite_file(engine.url.render_as_string(hide_password=False))
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # replicas starting together migrate one after the other
            await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        await conn.run_sync(_upgrade)

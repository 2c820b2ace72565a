"""A throwaway PostgreSQL server from the Debian package: unix socket only, in a temp dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.eventually import EventuallyTimeout, eventually

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def available() -> bool:
    return (PG_BIN / "postgres").exists() and shutil.which("runuser") is not None and os.geteuid() == 0


@contextmanager
def postgres_server() -> Iterator[Path]:
    """Start `postgres` as the postgres OS user; yields the socket directory; always stops and cleans up."""
    base = Path(tempfile.mkdtemp(prefix=f"coordpg-{os.getpid()}-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    shutil.chown(base, "postgres")
    shutil.chown(sock, "postgres")
    os.chmod(base, 0o755)
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        proc = subprocess.Popen(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(PG_BIN / "postgres"),
                "-D",
                str(data),
                "-k",
                str(sock),
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        server = proc

        def listening() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"exited with status {server.returncode}")
            return (sock / ".s.PGSQL.5432").exists()

        try:
            eventually(listening, within=30, what="PostgreSQL's socket")
        except (EventuallyTimeout, RuntimeError) as e:
            err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
            raise RuntimeError(f"test PostgreSQL did not start ({e}): {err[-500:]}") from None
        yield sock
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def create_database(sock: Path) -> str:
    """A fresh database; returns its SQLAlchemy URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(PG_BIN / "psql"),
            "-h",
            str(sock),
            "-U",
            "postgres",
            "-q",
            "-c",
            f"CREATE DATABASE {name}",
        ],
        check=True,
        capture_output=True,
    )
    return f"postgresql+asyncpg://postgres@/{name}?host={sock}"

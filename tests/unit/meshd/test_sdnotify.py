"""sd_notify readiness reaches a real unix datagram socket, as systemd's would."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd import sdnotify


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="sdn-")
    path = str(Path(d) / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


def test_ready_stopping_and_status_arrive(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    assert sdnotify.ready("2 peers", env=env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 peers"
    assert sdnotify.status("relay only", env=env)
    assert sock.recv(4096) == b"STATUS=relay only"
    assert sdnotify.stopping(env=env)
    assert sock.recv(4096) == b"STOPPING=1"


def test_uses_the_process_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("READY=1")
    assert sock.recv(4096) == b"READY=1"


def test_abstract_socket() -> None:
    name = f"meshd-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert sdnotify.ready(env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", ["", "relative/path"])
def test_noop_without_a_usable_socket(value: str) -> None:
    assert sdnotify.ready(env={"NOTIFY_SOCKET": value}) is False
    assert sdnotify.ready(env={}) is False


def test_nobody_listening_is_not_an_error(tmp_path: Path) -> None:
    assert sdnotify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False

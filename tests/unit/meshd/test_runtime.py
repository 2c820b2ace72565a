"""Crash clean-up (meshd.runtime): what a dead meshd left is removed; a live one's things are not touched."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from meshd import runtime


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _unix_socket_file(path: Path) -> None:
    """A socket file nobody listens on any more (what a SIGKILLed process leaves)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


@pytest.fixture
def crashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    state, uapi, hosts_file = tmp_path / "state", tmp_path / "wg.sock", tmp_path / "hosts"
    state.mkdir()
    monkeypatch.setattr(runtime, "socket_path", lambda ifname: uapi)
    monkeypatch.setattr(runtime.firewall, "remove_table", lambda ifname, timeout=10.0: None)
    hosts_file.write_text(
        "127.0.0.1 localhost\n# BEGIN meshd mnope0 (managed by meshd; edits inside are overwritten)\n"
        "100.64.0.2 b.mesh b\n# END meshd mnope0\n"
    )
    _unix_socket_file(uapi)
    _unix_socket_file(state / "meshd.sock")
    return state, uapi, hosts_file


async def test_leftovers_of_a_killed_meshd_are_removed(crashed: tuple[Path, Path, Path]) -> None:
    state, uapi, hosts_file = crashed
    runtime.write(state, runtime.Runtime(_dead_pid(), "mnope0", str(hosts_file), "userspace"))
    rt = await runtime.clean_leftovers(state)
    assert rt is not None and rt.interface == "mnope0"
    assert hosts_file.read_text() == "127.0.0.1 localhost\n"
    assert not uapi.exists(), "stale UAPI socket of a SIGKILLed wireguard-go"
    assert not (state / "meshd.sock").exists(), "stale control socket"
    assert runtime.read(state) is None


async def test_a_running_meshd_is_left_alone(crashed: tuple[Path, Path, Path]) -> None:
    state, uapi, hosts_file = crashed
    running = os.getppid()  # some live process that is not us
    runtime.write(state, runtime.Runtime(running, "mnope0", str(hosts_file), "userspace"))
    assert await runtime.clean_leftovers(state) is None
    assert "BEGIN meshd mnope0" in hosts_file.read_text()
    assert uapi.exists() and (state / "meshd.sock").exists()
    assert runtime.read(state) is not None

"""`meshd up --dns` (meshd/dns/service.py): which mode is in force, what is told to systemd-resolved and
undone on stop, and when the hosts block is written. A stand-in `resolvectl` script records its calls
(systemd-resolved itself cannot run on this machine: see the report of issue 17)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from meshd.dns import system
from meshd.dns.service import DnsConfigError, MeshDns


def fake_resolvectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, fails: bool) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    script = bin_dir / "resolvectl"
    body = "echo 'Failed to resolve interface \"mesh0\": No such device' >&2; exit 1" if fails else "exit 0"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n{body}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    running = tmp_path / "io.systemd.Resolve"
    running.touch()
    monkeypatch.setattr(system, "RESOLVED_SOCKET", running)
    return log


async def configured(mode: str) -> tuple[MeshDns, Any]:
    """A MeshDns for `mode` attached to a stand-in map applier and configured; both."""
    applier = SimpleNamespace(write_hosts=True, extra_addresses=(), on_names=None)
    creds = SimpleNamespace(enrollment=SimpleNamespace(domain="corp"), state=SimpleNamespace(enrollment=None))
    dns = MeshDns(mode, "mesh0")
    dns.attach(applier, creds)  # type: ignore[arg-type]
    await dns.configure(applier)  # type: ignore[arg-type]
    return dns, applier


async def test_auto_registers_split_dns_with_resolved_and_reverts_on_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_resolvectl(tmp_path, monkeypatch, fails=False)
    dns, applier = await configured("auto")
    assert applier.extra_addresses == ("100.100.100.100/32",)
    assert dns.active == "resolved" and applier.write_hosts is False
    await dns.close()
    assert log.read_text().splitlines() == [
        "dns mesh0 100.100.100.100",
        "domain mesh0 ~corp",
        "default-route mesh0 false",
        "revert mesh0",
    ]


async def test_auto_falls_back_to_the_hosts_block_when_resolved_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_resolvectl(tmp_path, monkeypatch, fails=True)
    dns, applier = await configured("auto")
    assert dns.active == "hosts" and applier.write_hosts is True
    await dns.close()  # nothing was registered: nothing to revert
    assert log.read_text().splitlines() == ["dns mesh0 100.100.100.100"]


async def test_resolved_asked_for_and_refused_is_a_start_up_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_resolvectl(tmp_path, monkeypatch, fails=True)
    with pytest.raises(DnsConfigError, match=r"No such device.*--dns hosts"):
        await configured("resolved")


async def test_hosts_never_asks_resolved_and_off_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_resolvectl(tmp_path, monkeypatch, fails=False)
    dns, applier = await configured("hosts")
    assert dns.active == "hosts" and applier.write_hosts is True and not log.exists()
    off, applier = await configured("off")
    assert off.active == "off" and not off.enabled and off.address is None
    assert applier.write_hosts is False and applier.extra_addresses == () and not log.exists()

"""How meshd tells the host about its resolver (meshd/dns/system.py): resolvectl command lines, the
auto choice, and the subprocess shell's errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.dns import system


def test_split_dns_registers_the_resolver_for_the_mesh_domain_only() -> None:
    assert system.register_commands("mesh0", "100.100.100.100", "mesh") == [
        ["resolvectl", "dns", "mesh0", "100.100.100.100"],
        ["resolvectl", "domain", "mesh0", "~mesh"],  # routing-only: no search domain, only mesh names
        ["resolvectl", "default-route", "mesh0", "false"],  # no other name is sent to the mesh link
    ]
    assert system.revert_commands("mesh0") == [["resolvectl", "revert", "mesh0"]]


def test_auto_is_resolved_where_it_runs_else_hosts() -> None:
    assert system.effective_mode("auto", True) == "resolved"
    assert system.effective_mode("auto", False) == "hosts"
    for mode in ("resolved", "hosts", "off"):
        assert system.effective_mode(mode, True) == mode
        assert system.effective_mode(mode, False) == mode


def test_resolved_counts_as_running_only_with_its_socket(tmp_path: Path) -> None:
    assert not system.resolved_running(tmp_path / "io.systemd.Resolve")


async def test_run_reports_the_failing_command_and_its_first_error_line() -> None:
    await system.run([["true"]])
    with pytest.raises(system.DnsSetupError, match=r"^sh -c .*: no such link$"):
        await system.run([["sh", "-c", "echo 'no such link' >&2; echo more >&2; exit 1"]])
    with pytest.raises(system.DnsSetupError, match="no-such-resolvectl-here"):
        await system.run([["no-such-resolvectl-here", "dns"]])
    with pytest.raises(system.DnsSetupError, match="no answer within"):
        await system.run([["sleep", "5"]], within=0.2)

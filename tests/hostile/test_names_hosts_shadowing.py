"""Hostile: a peer cannot take over a name the node's hosts file already has, by choosing its own name.

Peers choose their names at enrollment; meshd writes them into the host's hosts file. A peer named ``db``
on a host whose hosts file says ``10.0.0.5 db`` must not make ``db`` resolve to the peer (the first
matching line wins in glibc, but a block written above it, another resolver, or a tool reading the file
its own way would pick the peer's line). meshd then writes only ``db.<domain>`` (issue 12, "Identity").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.hosts import HostEntry, HostsFile

pytestmark = pytest.mark.hostile

SYSTEM = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n10.0.0.5 db  # the real database\n"


def addresses_of(text: str, name: str) -> list[str]:
    """Every address the file gives `name` (what any resolver reading it could answer)."""
    return [w[0] for line in text.splitlines() if (w := line.split("#", 1)[0].split()) and name in w[1:]]


def test_names_a_peer_named_like_a_hosts_entry_does_not_take_it_over(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(SYSTEM)
    hosts = HostsFile(path, "mesh0", "mesh")
    hosts.update(
        [HostEntry("100.64.0.7", "db"), HostEntry("100.64.0.8", "localhost"), HostEntry("100.64.0.9", "web")]
    )
    text = path.read_text()
    assert addresses_of(text, "db") == ["10.0.0.5"]  # still only the host's own entry
    assert addresses_of(text, "localhost") == ["127.0.0.1", "::1"]
    assert addresses_of(text, "db.mesh") == ["100.64.0.7"]  # the peer stays reachable by its mesh name
    assert addresses_of(text, "localhost.mesh") == ["100.64.0.8"]
    assert addresses_of(text, "web") == ["100.64.0.9"]  # positive control: a free name is written bare
    # once the host's entry is gone, the next map may use the bare name; our own lines never count
    path.write_text(text.replace("10.0.0.5 db  # the real database\n", ""))
    hosts.update([HostEntry("100.64.0.7", "db")])
    assert addresses_of(path.read_text(), "db") == ["100.64.0.7"]
    hosts.remove()
    assert path.read_text() == SYSTEM.replace("10.0.0.5 db  # the real database\n", "")

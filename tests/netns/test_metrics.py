"""meshd's Prometheus metrics scraped (httpx) from a running meshd: the values follow what the mesh does
(and `meshd ping` completes peer names from it)."""

from __future__ import annotations

import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.coordinator.test_completion import complete
from tests.eventually import eventually
from tests.netns.lab import Lab
from tests.netns.mesh import Mesh, Node

pytestmark = pytest.mark.netns

PORT = 9464
SCRAPE = (
    "import httpx, sys\n"
    "r = httpx.get(f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=5)\n"
    "r.raise_for_status()\n"
    "assert r.headers['content-type'].startswith('text/plain'), r.headers\n"
    "sys.stdout.write(r.text)\n"
)


def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics inside the node's namespace (the listener is on its loopback), parsed."""
    r = node.host.run([sys.executable, "-c", SCRAPE, str(PORT)], timeout=20)
    assert r.returncode == 0, r.stderr
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.stdout)
        for s in fam.samples
    }


def tcp_listeners(node: Node) -> set[int]:
    """The TCP ports this node's meshd process listens on (ss in its namespace, by the process id)."""
    assert node.proc is not None
    r = node.host.run(["ss", "-Hltnp"], timeout=20)
    assert r.returncode == 0, r.stderr
    mine = [line.split() for line in r.stdout.splitlines() if f"pid={node.proc.pid}," in line]
    return {int(cols[3].rsplit(":", 1)[1]) for cols in mine}


def test_metrics_follow_the_mesh(lab: Lab, mesh: Mesh) -> None:
    mesh.start_coordinator(lab.server())
    alpha = mesh.up(lab.host(nat="upnp"), "alpha", extra=("--metrics-listen", f"127.0.0.1:{PORT}"))
    beta = mesh.up(lab.host(nat="public"), "beta")
    mesh.wait_path(alpha, "beta", "direct", within=20)
    mesh.wait_ping(alpha, beta)

    def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        m = scrape(alpha)
        mapped = any(
            m.get(("meshd_portmap_active", (("protocol", p),))) == 1 for p in ("upnp", "natpmp", "pcp")
        )
        ok = m.get(("meshd_peers", (("path", "direct"),))) == 1 and mapped
        return m if ok else None

    m = eventually(settled, within=20, what="alpha's metrics show beta direct and a port map")
    # metrics are off by default: beta (no --metrics-listen) listens on no TCP port but its DNS resolver's
    assert PORT in tcp_listeners(alpha)  # positive control: the same check sees alpha's listener
    assert tcp_listeners(beta) <= {53}, tcp_listeners(beta)
    assert f":{PORT} " not in beta.host.run(["ss", "-Hltn"], timeout=20).stdout
    assert m["meshd_peers", (("path", "relay"),)] == 0 and m["meshd_peers", (("path", "none"),)] == 0
    assert m["meshd_coordinator_connected", ()] == 1
    assert m["meshd_map_version", ()] >= 1 and m["meshd_map_version_lag", ()] == 0
    assert 0 < m["meshd_portmap_lease_remaining_seconds", ()] <= 7200
    assert 0 <= m["meshd_peer_handshake_age_seconds", (("peer", "beta"),)] < 180
    assert 0 < m["meshd_peer_probe_rtt_seconds", (("peer", "beta"),)] < 1
    assert any(n == "meshd_relay_connected" for n, _ in m)

    # 10 pings of 1000 bytes: beta's counters and the direct path's grow by at least the payload
    rx0 = m["meshd_peer_receive_bytes_total", (("peer", "beta"),)]
    tx0 = m["meshd_peer_transmit_bytes_total", (("peer", "beta"),)]
    direct0 = m["meshd_path_receive_bytes_total", (("path", "direct"),)]
    r = alpha.host.run(["ping", "-n", "-q", "-c", "10", "-i", "0.05", "-s", "1000", mesh.overlay_ip(beta)])
    assert r.returncode == 0, r.stdout
    m = scrape(alpha)
    assert m["meshd_peer_receive_bytes_total", (("peer", "beta"),)] - rx0 >= 10_000
    assert m["meshd_peer_transmit_bytes_total", (("peer", "beta"),)] - tx0 >= 10_000
    assert m["meshd_path_receive_bytes_total", (("path", "direct"),)] - direct0 >= 10_000
    assert m["meshd_path_receive_bytes_total", (("path", "relay"),)] >= 0

    # shell completion of `meshd ping` asks this running meshd for its peers
    done = complete("meshd", f"meshd ping --state-dir {alpha.state_dir} b")
    assert done.stdout.split() == ["beta"], done.stderr

    # beta leaves: its series go, the peer count follows
    mesh.admin("nodes", "remove", "beta")
    eventually(
        lambda: not any(labels == (("peer", "beta"),) for _, labels in scrape(alpha)),
        within=10,
        what="beta's series gone from alpha's metrics",
    )
    assert scrape(alpha)["meshd_peers", (("path", "direct"),)] == 0

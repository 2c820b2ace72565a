"""meshd end to end in the lab: real coordinator, real meshd, real wireguard-go, real NAT, real ssh."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from meshd.status import Status
from tests.eventually import eventually
from tests.netns.lab import Host, Lab
from tests.netns.mesh import MESHD, Mesh, Node

pytestmark = pytest.mark.netns


def test_two_hosts_ping_both_ways_ssh_by_name_and_status_schema(mesh: Mesh, pair: tuple[Node, Node]) -> None:
    alpha, beta = pair
    mesh.wait_ping(alpha, beta)
    mesh.wait_ping(beta, alpha)
    key = mesh.start_sshd(beta.host)
    r = mesh.ssh(alpha, "beta", "ip netns identify", key)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == beta.host.ns, "ssh beta reached beta's namespace through the mesh"
    r = mesh.ssh(alpha, "beta.mesh", "hostname", key)
    assert r.returncode == 0, r.stderr

    doc = mesh.status(alpha)
    Status.from_json(doc)  # the DESIGN.md schema, field by field
    assert set(doc) >= {"self", "coordinator", "peers"}
    assert doc["self"]["name"] == "alpha" and doc["self"]["backend"] == "userspace"
    assert doc["coordinator"]["connected"] is True
    [peer] = doc["peers"]
    assert peer["name"] == "beta" and peer["path"] == "direct"
    assert peer["endpoint"] == f"{beta.host.ip}:41641"
    assert peer["last_handshake"] and peer["rx_bytes"] > 0
    assert "100.64." in mesh.hosts_block(alpha).split("beta.mesh")[0].splitlines()[-1]

    out = mesh.meshd(alpha, "ping", "beta").stdout
    assert out.startswith("pong from beta") and "via direct" in out
    human = mesh.meshd(alpha, "status").stdout
    assert "beta" in human and "direct" in human


def test_removed_node_leaves_the_other_nodes_wireguard_and_hosts_within_1s(
    mesh: Mesh, pair: tuple[Node, Node]
) -> None:
    alpha, beta = pair
    beta_key = mesh.status(beta)["self"]["public_key"]
    assert beta_key in alpha.host.run(["wg", "show", alpha.interface, "peers"], check=True).stdout
    t0 = time.monotonic()
    mesh.admin("nodes", "remove", "beta")
    t_cli = time.monotonic() - t0

    def beta_gone() -> bool:  # cheap reads: `wg` and the file itself
        wg_peers = alpha.host.run(["wg", "show", alpha.interface, "peers"], check=True).stdout
        return beta_key not in wg_peers and "beta" not in mesh.hosts_block(alpha)

    eventually(beta_gone, within=5, interval=0.02, what="beta gone from alpha's WireGuard and hosts file")
    elapsed = time.monotonic() - t0
    # the admin CLI's own start-up is not the mesh's latency: count from when the command returned,
    # but report both
    assert elapsed - t_cli < 1.0, (
        f"took {elapsed - t_cli:.2f} s after the CLI returned ({elapsed:.2f} s in all)"
    )
    assert mesh.peer(alpha, "beta") is None
    # the removed node itself is told and stops with a clear message
    assert beta.proc is not None
    assert beta.proc.wait(10) == 1
    assert "removed" in beta.log_tail()


def test_tunnels_survive_a_coordinator_outage_and_the_stream_comes_back(
    mesh: Mesh, pair: tuple[Node, Node]
) -> None:
    alpha, beta = pair
    # the relay lives in the coordinator here, so the tunnel that must survive is the direct one
    mesh.wait_path(alpha, "beta", "direct")
    mesh.wait_path(beta, "alpha", "direct")
    mesh.wait_ping(alpha, beta)

    def wireguard_on_the_direct_path() -> bool:
        # "direct" in status is the path machine's decision; WireGuard itself must send there too (it
        # roams onto the relay port when the peer's last relayed packets arrive after the switch)
        for node, other in ((alpha, beta), (beta, alpha)):
            peer = mesh.peer(node, other.name)
            eps = node.host.run(["wg", "show", node.interface, "endpoints"], check=True).stdout
            if peer is None or peer["path"] != "direct" or f"\t{peer['endpoint']}\n" not in eps:
                return False
        return True

    eventually(wireguard_on_the_direct_path, within=5, what="both WireGuards on the direct endpoint")
    mesh.stop_coordinator()
    # 10 s of pings, two a second, while the coordinator is down: every one must be answered
    sent = 20
    r = alpha.host.run(
        ["ping", "-n", "-c", str(sent), "-i", "0.5", "-W", "1", mesh.overlay_ip(beta)], timeout=sent + 20
    )
    received = re.search(r"(\d+) received", r.stdout)
    assert received is not None, r.stdout + r.stderr
    lost = sent - int(received.group(1))
    assert lost == 0, (
        f"{lost} of {sent} pings lost while the coordinator was down:\n{r.stdout}\n"
        f"--- alpha ---\n{alpha.log_tail(60)}\n--- beta ---\n{beta.log_tail(60)}\n"
        f"--- wg alpha ---\n{alpha.host.run(['wg', 'show', alpha.interface, 'dump']).stdout}"
        f"--- wg beta ---\n{beta.host.run(['wg', 'show', beta.interface, 'dump']).stdout}"
    )
    assert mesh.status(alpha)["coordinator"]["connected"] is False
    assert mesh.coord_host is not None
    mesh.start_coordinator(mesh.coord_host)
    eventually(
        lambda: mesh.status(alpha)["coordinator"]["connected"],
        within=5,
        what="alpha's stream back to the coordinator",
    )
    assert mesh.ping(alpha, beta)


def test_restart_keeps_identity_without_reenrolling(mesh: Mesh, pair: tuple[Node, Node]) -> None:
    alpha, beta = pair
    before = mesh.status(alpha)["self"]
    assert mesh.stop(alpha) == 0
    assert alpha.host.run(["ip", "link", "show", alpha.interface]).returncode != 0, "interface removed"
    assert "BEGIN meshd" not in mesh.hosts_block(alpha), "hosts block removed"
    mesh.start(alpha)  # no key this time
    mesh.wait_ready(alpha)
    after = mesh.status(alpha)["self"]
    assert (after["name"], after["ips"], after["public_key"]) == (
        before["name"],
        before["ips"],
        before["public_key"],
    )
    mesh.wait_peer(alpha, "beta")
    mesh.wait_ping(alpha, beta)
    nodes = json.loads(mesh.admin("nodes", "list", "--json").stdout)
    assert sorted(n["name"] for n in nodes) == ["alpha", "beta"], "no second enrollment"


def test_meshd_down_and_crash_leftovers(mesh: Mesh, pair: tuple[Node, Node]) -> None:
    alpha, _ = pair
    # a crash (SIGKILL) leaves the hosts block; `meshd down` cleans up even without a daemon
    assert alpha.proc is not None
    alpha.proc.kill()
    alpha.proc.wait(5)
    assert "BEGIN meshd" in mesh.hosts_block(alpha)
    out = mesh.meshd(alpha, "down").stdout
    assert "leftovers" in out
    assert "BEGIN meshd" not in mesh.hosts_block(alpha)
    assert alpha.host.run(["ip", "link", "show", alpha.interface]).returncode != 0
    # and a running daemon stops on `meshd down`, removing what it made
    mesh.start(alpha)
    mesh.wait_ready(alpha)
    mesh.wait_peer(alpha, "beta")
    assert "meshd stopped" in mesh.meshd(alpha, "down").stdout
    assert alpha.proc.wait(10) == 0
    assert "BEGIN meshd" not in mesh.hosts_block(alpha)
    assert alpha.host.run(["ip", "link", "show", alpha.interface]).returncode != 0


def _up_fails(node_host_run: subprocess.CompletedProcess[str]) -> str:
    assert node_host_run.returncode != 0
    lines = node_host_run.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), node_host_run.stderr
    assert "Traceback" not in node_host_run.stderr
    return lines[-1]


@dataclass(frozen=True)
class BadEnv:
    mesh: Mesh
    host: Host


@pytest.fixture(scope="module")
def bad_env() -> Iterator[BadEnv]:
    """One lab for every bad-input case: a coordinator and a host behind a NAT (cases leave nothing)."""
    with Lab() as lab:
        mesh = Mesh(lab)
        try:
            mesh.start_coordinator(lab.server())
            h = lab.host(nat="eim")
            mesh._hosts_file(h)
            yield BadEnv(mesh, h)
        finally:
            mesh.close()


def _bad_up(
    env: BadEnv, case: str, *args: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    sd = str(env.mesh.dir / f"bad-{case}")
    iface = f"b{env.mesh.tag}{case[:3]}"[:15]
    return env.host.run([*prefix, MESHD, "up", "--state-dir", sd, "--interface", iface, *args], timeout=30)


def _unreachable(env: BadEnv) -> subprocess.CompletedProcess[str]:
    return _bad_up(env, "unreach", "--coordinator", "http://7.0.0.250:9", "--auth-key", "x")


def _bad_key(env: BadEnv) -> subprocess.CompletedProcess[str]:
    return _bad_up(env, "badkey", "--coordinator", env.mesh.url, "--auth-key", "not-a-real-key")


def _expired_key(env: BadEnv) -> subprocess.CompletedProcess[str]:
    expired = env.mesh.new_key("tester", "--expiration", "1s")
    time.sleep(1.5)  # part of the case, not synchronisation: wait out the key's real lifetime
    return _bad_up(env, "expired", "--coordinator", env.mesh.url, "--auth-key", expired)


def _bad_backend(env: BadEnv) -> subprocess.CompletedProcess[str]:
    return _bad_up(env, "backend", "--coordinator", env.mesh.url, "--wg-backend", "bogus")


def _bad_url(env: BadEnv) -> subprocess.CompletedProcess[str]:
    return _bad_up(env, "url", "--coordinator", "ftp://x")


def _no_wireguard(env: BadEnv) -> subprocess.CompletedProcess[str]:
    """A kernel without the module and no wireguard-go on PATH."""
    good = env.mesh.new_key()
    return _bad_up(
        env, "nowg", "--coordinator", env.mesh.url, "--auth-key", good, "--wg-backend", "auto",
        prefix=("env", "PATH=/nonexistent"),
    )  # fmt: skip


def _corrupt_state(env: BadEnv) -> subprocess.CompletedProcess[str]:
    sd = env.mesh.dir / "bad-corrupt"
    sd.mkdir(mode=0o700, exist_ok=True)
    (sd / "state.json").write_text("{not json")
    (sd / "state.json").chmod(0o600)
    return _bad_up(env, "corrupt", "--coordinator", env.mesh.url)


def _not_root(env: BadEnv) -> subprocess.CompletedProcess[str]:
    return env.host.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", MESHD, "up",
         "--state-dir", "/tmp/nonexistent-meshd", "--coordinator", env.mesh.url],
    )  # fmt: skip


BAD_INPUT: dict[str, tuple[Callable[[BadEnv], subprocess.CompletedProcess[str]], tuple[str, ...]]] = {
    "coordinator-unreachable": (_unreachable, ("cannot reach the coordinator",)),
    "unknown-auth-key": (_bad_key, ("enrollment failed", "fresh key")),
    "expired-auth-key": (_expired_key, ("enrollment failed",)),
    "unknown-wg-backend": (_bad_backend, ("--wg-backend",)),
    "non-http-url": (_bad_url, ("http://",)),
    "no-wireguard": (_no_wireguard, ("modprobe wireguard", "wireguard-go")),
    "corrupt-state-file": (_corrupt_state, ("corrupt", "move it away")),
    "not-root": (_not_root, ("root",)),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gives_one_line_errors_and_leaves_nothing(bad_env: BadEnv, case: str) -> None:
    run, expected = BAD_INPUT[case]
    msg = _up_fails(run(bad_env))
    for text in expected:
        assert text in msg
    # nothing half-configured: no interface, no hosts block
    links = bad_env.host.run(["ip", "-o", "link"], check=True).stdout
    assert f"b{bad_env.mesh.tag}" not in links
    assert "BEGIN meshd" not in bad_env.mesh.hosts_block(bad_env.host)

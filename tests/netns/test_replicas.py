"""Two coordinator replicas on one PostgreSQL database, each on its own server in the lab; real meshd daemons
given both URLs (`--coordinator URL1,URL2`). Replica 1 is killed (SIGKILL): every node's map stream is back
on replica 2 within 5 s, resuming with `since`, a change made through replica 2 reaches them, and the
tunnel between them keeps passing traffic (issue 16)."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import sharedsecrets
from tests.coordinator import pg
from tests.eventually import eventually
from tests.netns.lab import Host, Lab
from tests.netns.mesh import COORD_PORT, COORDINATOR, Mesh, MeshError, Node

pytestmark = [pytest.mark.netns, pytest.mark.postgres]

FAILOVER_WITHIN = 5.0
REGION2 = "replica-1001"  #: the second replica's relay region (coordinator/replicarelays.py)


@pytest.fixture(scope="module")
def pg_socket() -> Iterator[Path]:
    if not pg.available():
        pytest.skip("needs root and Debian's postgresql package")
    with pg.postgres_server() as sock:
        yield sock


def _replica(mesh: Mesh, host: Host, state: Path, extra: tuple[str, ...]) -> subprocess.Popen[bytes]:
    """A second `coordinator serve`: own state dir, nothing copied (the secrets come from the database)."""
    state.mkdir(mode=0o700)
    log = open(mesh.dir / "replica2.log", "ab")  # noqa: SIM115 - owned by the process
    proc = host.popen(
        [COORDINATOR, "--state-dir", str(state), "serve", "--listen", f"{host.ip}:{COORD_PORT}", *extra],
        stdout=log,
        stderr=log,
    )
    log.close()

    def healthy() -> bool:
        if proc.poll() is not None:
            raise MeshError(f"replica 2 exited {proc.returncode}:\n{(mesh.dir / 'replica2.log').read_text()}")
        r = host.run(
            [
                "python3",
                "-c",
                f"import urllib.request as u; u.urlopen('http://{host.ip}:{COORD_PORT}/healthz', timeout=1)",
            ]
        )
        return r.returncode == 0 and (state / "admin.sock").exists()

    eventually(healthy, within=20, interval=0.1, what="replica 2 healthy")
    return proc


def _shared_database(mesh: Mesh, pg_socket: Path) -> tuple[str, ...]:
    """`coordinator serve` flags of the replicas: a fresh database and the secrets' at-rest key."""
    db = pg.create_database(pg_socket)
    key = mesh.dir / "secrets.key"
    key.write_text(sharedsecrets.new_key_text() + "\n")
    key.chmod(0o600)
    return ("--database", db, "--secrets-key-file", str(key))


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _admin(state: Path, *args: str) -> str:
    r = subprocess.run(
        [COORDINATOR, "--state-dir", str(state), *args], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _online(state: Path) -> dict[str, bool]:
    return {n["name"]: n["online"] for n in json.loads(_admin(state, "nodes", "list", "--json"))}


def _log_time(line: str) -> float:
    """The unix time of a meshd log line (``ts=2026-12-02T05:07:05.410Z ...``)."""
    ts = line.split("ts=", 1)[1].split()[0]
    return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _on(mesh: Mesh, node: Node, url: str) -> bool:
    c = mesh.status(node)["coordinator"]
    return bool(c["url"] == url and c["connected"])


def test_nodes_fail_over_to_the_surviving_replica_and_tunnels_keep_working(
    lab: Lab, mesh: Mesh, pg_socket: Path
) -> None:
    common = _shared_database(mesh, pg_socket)
    url1 = mesh.start_coordinator(lab.server(name="r1"), extra=common)
    s2 = lab.server(name="r2")
    state2 = mesh.dir / "coordinator2"
    replica2 = _replica(mesh, s2, state2, common)
    url2 = f"http://{s2.ip}:{COORD_PORT}"
    try:
        mesh.url = f"{url1},{url2}"  # every meshd gets both
        a = mesh.up(lab.host(nat="public"), "a")
        b = mesh.up(lab.host(nat="eim"), "b")
        mesh.wait_peer(a, "b")
        mesh.wait_ping(a, b)
        mesh.wait_ping(b, a)
        assert _on(mesh, a, url1) and _on(mesh, b, url1)
        # online is right on the replica the nodes do not stream to
        eventually(lambda: _online(state2) == {"a": True, "b": True}, within=10, what="online on replica 2")

        # a relay region per replica: the nodes home on the faster of the two (the same here)
        assert _relay(mesh, a) in ("default", REGION2)

        assert mesh.coord_proc is not None
        killed = time.time()
        mesh.coord_proc.send_signal(signal.SIGKILL)  # replica 1 dies
        for n in (a, b):  # (status is polled through `meshd status`: slow on a busy machine)
            eventually(lambda n=n: _on(mesh, n, url2), within=20, interval=0.2, what=f"{n.name} on replica 2")
        for n in (a, b):  # the time the stream was back, from meshd's own log
            back = [ln for ln in n.log_tail(400).splitlines() if "coordinator stream connected" in ln][-1]
            assert "since=None" not in back, back  # resumed with `since`: only what was missed
            took = _log_time(back) - killed
            assert 0 < took < FAILOVER_WITHIN, f"{n.name}: stream back on replica 2 after {took:.2f} s"
            print(f"{n.name}: stream back on replica 2 {took:.2f} s after replica 1 was killed")
        # the relay map came with the resumed stream: the nodes move to replica 2's relay region
        for n in (a, b):
            eventually(
                lambda n=n: mesh.status(n)["self"]["relay"] == REGION2, within=30, what=f"{n.name} relay up"
            )
        # a change made through the surviving replica reaches both
        _admin(state2, "nodes", "rename", "b", "bee")
        mesh.wait_peer(a, "bee", within=5)
        assert mesh.ping(a, b) and mesh.ping(b, a)  # the tunnel never depended on the coordinator
        assert _online(state2) == {"a": True, "bee": True}
    finally:
        _terminate(replica2)


def _relay(mesh: Mesh, node: Node) -> str | None:
    return mesh.status(node)["self"]["relay"]  # type: ignore[no-any-return]


def test_nodes_homed_on_different_replicas_relay_to_each_other_and_after_one_dies(
    lab: Lab, mesh: Mesh, pg_socket: Path
) -> None:
    """Each replica's embedded relay is its own region (issue 16): a node homed on replica 1's region and
    one homed on replica 2's, both behind EDM NATs (every packet relayed), streaming to different
    replicas, reach each other through each other's home region; replica 1 is killed, and they reach
    each other again once the node homed there moved to replica 2's region."""
    common = _shared_database(mesh, pg_socket)
    # replica 1's region is 60 ms away: a node choosing between the two regions picks replica 2's
    url1 = mesh.start_coordinator(lab.server(name="r1", delay_ms=30), extra=common)
    s2 = lab.server(name="r2")
    url2 = f"http://{s2.ip}:{COORD_PORT}"
    mesh.url = f"{url1},{url2}"
    a = mesh.up(lab.host(nat="edm"), "a")  # the only region yet is replica 1's: a's home
    eventually(lambda: _relay(mesh, a) == "default", within=20, interval=0.2, what="a homed on replica 1")
    replica2 = _replica(mesh, s2, mesh.dir / "coordinator2", common)
    try:
        mesh.url = f"{url2},{url1}"
        b = mesh.up(lab.host(nat="edm"), "b")
        eventually(lambda: _relay(mesh, b) == REGION2, within=20, interval=0.2, what="b homed on replica 2")
        assert _on(mesh, a, url1) and _on(mesh, b, url2)
        assert _relay(mesh, a) == "default", "a keeps its home when replica 2's region appears"
        mesh.wait_peer(a, "b")
        mesh.wait_peer(b, "a")
        took = mesh.wait_ping(a, b, within=20)
        mesh.wait_ping(b, a)
        assert (mesh.peer(a, "b") or {}).get("path") == "relay" == (mesh.peer(b, "a") or {}).get("path")
        print(f"a (home default, replica 1) <-> b (home {REGION2}, replica 2): ping after {took:.1f} s")

        assert mesh.coord_proc is not None
        killed = time.monotonic()
        mesh.coord_proc.send_signal(signal.SIGKILL)  # replica 1 and its relay region die
        mesh.wait_ping(a, b, within=30)
        mesh.wait_ping(b, a, within=10)
        print(f"a and b reach each other again {time.monotonic() - killed:.1f} s after replica 1 was killed")
        eventually(lambda: _on(mesh, a, url2), within=20, interval=0.2, what="a on replica 2")
        eventually(lambda: _relay(mesh, a) == REGION2, within=30, interval=0.2, what="a homed on replica 2")
        mesh.wait_ping(a, b, within=10)  # through a's new home region too
        mesh.wait_ping(b, a, within=10)
        print(f"a homed on {REGION2}, both ways pinging: {time.monotonic() - killed:.1f} s after the kill")
    finally:
        _terminate(replica2)

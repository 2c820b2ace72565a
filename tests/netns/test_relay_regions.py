"""A standalone relay region (`coordinator relay serve`) next to the embedded one, in the lab: real processes,
real latency (the embedded region sits behind a 30 ms link), EDM NATs so every packet goes through a relay."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.eventually import EventuallyTimeout, eventually
from tests.netns.lab import Host, Lab
from tests.netns.mesh import Mesh, MeshError

pytestmark = pytest.mark.netns
COORDINATOR = str(Path(sys.executable).parent / "coordinator")


def _start_region(mesh: Mesh, host: Host) -> subprocess.Popen[bytes]:
    log = open(mesh.dir / "region2.log", "ab")  # noqa: SIM115 - owned by the process
    proc = host.popen(
        [
            COORDINATOR,
            "relay",
            "serve",
            "--listen",
            f"{host.ip}:8443",
            "--coordinator",
            mesh.url,
            "--secret-file",
            str(mesh.coord_dir / "relay.secret"),
            "--name",
            "near",
            "--stun-port",
            "3478",
        ],
        stdout=log,
        stderr=log,
    )
    log.close()
    return proc


def _self_relay(mesh: Mesh, node: object) -> str | None:
    return mesh.status(node)["self"]["relay"]  # type: ignore[arg-type,no-any-return]


def _wait_home(mesh: Mesh, node: object, name: str, within: float = 20.0) -> None:
    try:
        eventually(
            lambda: _self_relay(mesh, node) == name, within=within, interval=0.2, what=f"home is {name}"
        )
    except EventuallyTimeout as e:
        raise MeshError(f"{e}\n{(mesh.dir / 'region2.log').read_text()}") from None


def test_home_region_by_latency_traffic_through_it_and_failover(lab: Lab, mesh: Mesh) -> None:
    far = lab.server(name="coord", delay_ms=30)  # the coordinator and its embedded region: 60 ms round trip
    near = lab.server(name="near")
    mesh.start_coordinator(far)
    region = _start_region(mesh, near)
    eventually(
        lambda: (
            "'near' at" in mesh.coordinator_log(200) and "joined the relay map" in mesh.coordinator_log(200)
        ),
        within=10,
        what="the region joined the relay map over its feed",
    )
    a = mesh.up(lab.host(nat="edm"), "a", wait=False)
    b = mesh.up(lab.host(nat="edm"), "b", wait=False)
    for n in (a, b):
        mesh.wait_ready(n)
    _wait_home(mesh, a, "near")
    _wait_home(mesh, b, "near")
    mesh.wait_path(a, "b", "relay")
    mesh.wait_ping(a, b)
    mesh.wait_ping(b, a)
    # the region goes away: both fall back to the embedded region and traffic resumes
    region.terminate()
    region.wait(10)
    t0 = time.monotonic()
    _wait_home(mesh, a, "default", within=15)
    _wait_home(mesh, b, "default", within=15)
    mesh.wait_ping(a, b, within=10)
    took = time.monotonic() - t0
    assert took < 15, f"traffic back after {took:.1f} s"

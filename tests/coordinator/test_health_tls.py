"""/healthz, Prometheus /metrics, and the node API over HTTPS with --tls-cert/--tls-key."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from meshd.control import ControlClient, Enrollment, NodeKeys
from tests.coordinator.conftest import Coord
from tests.coordinator.test_cli import cli, free_port, start_server_args, stop_server


async def test_healthz_and_metrics(coord: Coord) -> None:
    await coord.enroll("m1")
    health = (await coord.api.get("/healthz")).json()
    assert health["status"] == "ok" and health["nodes"] == 1 and health["map_version"] >= 1
    text = (await coord.api.get("/metrics")).text
    for metric in (
        "coordinator_connected_nodes",
        "coordinator_map_version",
        "coordinator_enrollments_total 1.0",
        "coordinator_request_seconds_bucket",
    ):
        assert metric in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")
def test_https_listener(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    state, port = tmp_path / "state", free_port()
    proc = start_server_args(state, port, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        cli(state, "users", "create", "tls")
        authkey = cli(state, "keys", "create", "--user", "tls").stdout.split()[-1]

        async def enroll() -> None:
            async with ControlClient(f"https://127.0.0.1:{port}", NodeKeys.generate(), verify=str(cert)) as c:
                assert isinstance(await c.register("secure", auth_key=authkey), Enrollment)
                async with c.stream() as s:
                    m = await s.next_map(within=5)
                    assert m.self_node.name == "secure"

        asyncio.run(enroll())
    finally:
        err = stop_server(proc)
    assert "plain HTTP" not in err

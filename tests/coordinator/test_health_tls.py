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


def test_metrics_listen_moves_metrics_off_the_node_port(tmp_path: Path) -> None:
    """`--metrics-listen`: /metrics is served there only; the node port answers 404 for it."""
    import httpx

    state, port, mport = tmp_path / "state", free_port(), free_port()
    proc = start_server_args(state, port, "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        public = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert public.status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        scrape = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5)
        assert scrape.status_code == 200 and "coordinator_map_version" in scrape.text
    finally:
        stop_server(proc)


def test_preauth_and_metrics_settings() -> None:
    from coordinator.settings import SettingsError, load_settings

    s = load_settings({}, env={})
    assert (s.preauth_timeout, s.preauth_max, s.preauth_max_per_source, s.metrics_listen) == (
        5.0,
        1024,
        64,
        None,
    )
    env = {
        "COORDINATOR_PREAUTH_TIMEOUT": "3s",
        "COORDINATOR_PREAUTH_MAX": "10",
        "COORDINATOR_METRICS_LISTEN": ":9100",
    }
    s = load_settings({}, env=env)
    assert (s.preauth_timeout, s.preauth_max, s.metrics_listen) == (3.0, 10, ":9100")
    with pytest.raises(SettingsError):
        load_settings({"metrics_listen": "nope"}, env={})
    with pytest.raises(SettingsError):
        load_settings({"preauth_max_per_source": 0}, env={})

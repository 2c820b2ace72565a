"""Hostile: endpoint candidates, names and log text chosen by a client never become extra config lines
(issue 13, "Hostile map content", "Log escaping").

An IPv6 zone id may hold any character: ``[2a00::1%x]:1\\nremove=true\\nendpoint=[::1]:51820`` was taken
by the coordinator, sent to every peer in maps, and written by ``uapi.encode_set`` as three UAPI lines
(one of them removing a peer). The coordinator now refuses it (ASGI, the long-poll message route; the
WebSocket stream uses the same codec), and each of meshd's line-based writers (UAPI, hosts file, nft
script) refuses it again when fed directly. A name with a trailing newline (``$`` accepts one) is
refused; a log line with ``\\r`` or ESC is escaped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from meshd import firewall, hosts, logfmt
from meshd.proto import cmm, netmap, signing
from meshd.proto.policy import InboundRule
from meshd.wg import model, uapi
from meshd.wg.diff import UpdatePeer
from meshd.wg.errors import WgConfigError
from tests.coordinator.conftest import Coord, coord, core, settings  # noqa: F401 - fixtures

pytestmark = pytest.mark.hostile


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: these checks are about input validation, not the database."""
    return f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"


HOSTILE = "[2a00::1%x]:1\nremove=true\nendpoint=[::1]:51820"
KEY = "mFxBxcJ4oxo0WIEHGTb4Cdk8rOpBc+pIxe2WcaPwtms="  # any valid WireGuard public key


async def _post(coord: Coord, body: bytes) -> int:  # noqa: F811
    """Enroll one node and post `body` as its long-poll stream message; the status code."""
    client, e = await coord.enroll("n1")
    h = signing.sign_request(
        client.keys.node_private, str(e.node_id), "POST", "/api/v1/messages", body, time.time()
    )
    r = await coord.api.post("/api/v1/messages", headers=h, content=body)
    return r.status_code


@pytest.mark.parametrize(
    "candidate",
    [
        HOSTILE,
        "[fe80::1%eth0]:51820",
        "1.2.3.4:51820\n",
        "[::1]:51820\r",
        "\x1b[2J1.2.3.4:1",
        "host.example:1",
    ],
)
async def test_coordinator_refuses_non_canonical_candidates(coord: Coord, candidate: str) -> None:  # noqa: F811
    body = json.dumps({"type": "endpoints", "candidates": ["6.0.0.1:41641", candidate]}).encode()
    assert await _post(coord, body) == 400
    [node] = (await coord.admin.get("/admin/nodes")).json()
    assert node["endpoints"] == [], "nothing of a refused report is stored"


async def test_coordinator_stores_candidates_in_canonical_spelling(coord: Coord) -> None:  # noqa: F811
    body = json.dumps({"type": "endpoints", "candidates": ["[2A00:0::1]:51820", "6.0.0.1:41641"]}).encode()
    assert await _post(coord, body) == 204
    [node] = (await coord.admin.get("/admin/nodes")).json()
    assert node["endpoints"] == ["[2a00::1]:51820", "6.0.0.1:41641"]


def test_codec_refuses_the_zone_id_endpoint() -> None:
    with pytest.raises(netmap.NetmapError):
        netmap.decode_client_message(json.dumps({"type": "endpoints", "candidates": [HOSTILE]}))
    with pytest.raises(cmm.CallMeMaybeError):
        cmm.parse_endpoint(HOSTILE)


def test_uapi_writer_never_writes_extra_lines() -> None:
    """Fed directly (as if the coordinator had let it through): no UAPI request carries the lines."""
    with pytest.raises(WgConfigError):
        model.parse_endpoint(HOSTILE)
    with pytest.raises(WgConfigError):
        model.PeerConfig(public_key=KEY, endpoint=("2a00::1%x\nremove=true", 1))
    # an op built without PeerConfig's checks is refused by the encoder itself
    with pytest.raises(WgConfigError):
        uapi.encode_set([UpdatePeer(KEY, endpoint=("2a00::1%x\nremove=true\nendpoint=[::1]:51820", 1))])
    with pytest.raises(WgConfigError):
        uapi.encode_set([UpdatePeer(KEY, allowed_ips=("10.0.0.1/32\nremove=true",))])
    ok = uapi.encode_set([UpdatePeer(KEY, endpoint=("2a00::1", 1))]).decode()
    assert ok.count("\n") == 5 and "endpoint=[2a00::1]:1\n" in ok


def test_hosts_writer_never_writes_extra_lines() -> None:
    with pytest.raises(hosts.HostsError):
        hosts.HostEntry("fe80::1%x\n10.0.0.1 evil", "b")
    with pytest.raises(hosts.HostsError):
        hosts.HostEntry("100.64.0.2", "b\n")  # `$` accepts a trailing newline; fullmatch does not
    text = hosts.render("", "mesh0", [hosts.HostEntry("100.64.0.2", "b")])
    assert text.count("\n") == 3


def test_nft_writer_never_writes_extra_lines() -> None:
    for rule in (
        InboundRule(("fe80::%x\n}\ntable inet evil {/64",), "any", ()),
        InboundRule(("10.0.0.0/8",), "tcp\naccept", ()),
        InboundRule(("10.0.0.0/8",), "tcp", ((1, 70000),)),
    ):
        with pytest.raises(firewall.FirewallError):
            firewall.render("mesh0", (rule,))
    with pytest.raises(firewall.FirewallError):
        firewall.render('mesh0"\naccept', (InboundRule(("10.0.0.0/8",), "tcp", ((22, 22),)),))
    script = firewall.render("mesh0", (InboundRule(("10.0.0.0/8",), "tcp", ((22, 22),)),))
    assert "%" not in script and "evil" not in script


async def test_names_with_a_trailing_newline_are_refused(coord: Coord) -> None:  # noqa: F811
    for name in ("alice\n", "alice\n10.0.0.1 evil"):
        r = await coord.admin.post("/admin/users", json={"name": name})
        assert r.status_code == 400, r.text
    r = await coord.admin.post("/admin/users", json={"name": "alice"})
    assert r.status_code == 201, r.text
    with pytest.raises(WgConfigError):
        model.check_ifname("mesh0\n")
    with pytest.raises(hosts.HostsError):
        hosts.HostsFile(tag="mesh0\n")


@pytest.mark.parametrize("formatter", [logfmt.LogfmtFormatter(), logfmt.EscapingFormatter("%(message)s")])
def test_log_lines_escape_cr_and_esc(formatter: logging.Formatter) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "peer %s", ("b\rforged\x1b[2Jx\n",), None)
    line = formatter.format(record)
    assert "\r" not in line and "\x1b" not in line and "\n" not in line
    assert "\\r" in line and "\\x1b" in line


async def test_a_stun_port_of_65535_never_makes_port_65536() -> None:
    """A region's `stun_port + 1` overflowed in RawPort.send (struct.error) and ended the NAT timer
    task. The region codec refuses 65535 now; meshd's own guards hold without it."""
    from types import SimpleNamespace

    from meshd.mapapply import MapApplier
    from meshd.nat.rawport import RawPort, RawPortError

    region = SimpleNamespace(stun_port=65535, url="https://relay.example", name="r1", ipv6=None)
    applier = SimpleNamespace(_resolved={"relay.example": "6.0.0.1"})
    got = await MapApplier._stun_servers(applier, SimpleNamespace(relays=[region]))  # type: ignore[arg-type]
    assert got == [("6.0.0.1", 65535)]

    class NoSocket:
        def sendto(self, data: bytes, addr: object) -> int:
            raise AssertionError("nothing may be sent to port 65536")

    port = SimpleNamespace(sock=NoSocket(), port=41641)
    with pytest.raises(RawPortError):
        RawPort.send(port, b"x", ("6.0.0.1", 65536))  # type: ignore[arg-type]

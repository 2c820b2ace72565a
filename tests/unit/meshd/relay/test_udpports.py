"""meshd's UDP relay port shell: which addresses count as a peer's relay (for the roaming guard)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from meshd.proto import relay, relayport
from meshd.relay import link as rlink
from meshd.relay.udpports import PAST_PORTS, UdpPorts

PEER = b"\x0b" * 32
RELAY_IP = "192.0.2.1"


class _Link:
    """The parts of a relay link the port shell uses."""

    udp_ports = True
    peer_ip = RELAY_IP
    is_open = True

    def __init__(self) -> None:
        self.on_port: Callable[[relay.Frame], None] | None = None
        self.requests: list[bytes] = []

    def request_port(self, peer: bytes) -> None:
        self.requests.append(peer)

    def frame(self, type_: relay.FrameType, payload: bytes) -> None:
        assert self.on_port is not None
        self.on_port(relay.Frame(type_, payload))


class _Sock:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


def _ports() -> tuple[UdpPorts, _Link, list[bytes]]:
    moved: list[bytes] = []
    ports = UdpPorts(41641, on_moved=moved.append, clock=lambda: 100.0)
    ports._sock = cast(Any, _Sock())  # no raw socket in a unit test: binds are recorded, not sent
    link = _Link()
    ports.session_up(1, cast(rlink.RelayLink, link))
    return ports, link, moved


def _ready(link: _Link, port: int) -> None:
    link.frame(relay.FrameType.PORT_GRANT, relayport.encode_grant(relayport.Grant(PEER, port, b"s" * 16, 30)))
    link.frame(relay.FrameType.PORT_STATE, relayport.encode_state(PEER, relayport.PortFlags.READY))


def test_a_ready_port_is_the_peers_relay_endpoint_and_stays_recognised_after_we_stop_using_it() -> None:
    ports, link, moved = _ports()
    ports.want(PEER, 1, True)
    assert link.requests == [PEER]
    _ready(link, 40001)
    assert ports.endpoint(PEER) == (RELAY_IP, 40001) and moved == [PEER]
    # the path went direct: we stop binding, so the port is no longer where WireGuard should send...
    ports.want(PEER, 1, False)
    assert ports.endpoint(PEER) is None
    # ...but the relay forwards until the allocation idles out, the peer's last packets come from it,
    # and WireGuard roams there: it must still count as a relay address so the roam is undone (the CI
    # failure: both sides "direct" with WireGuard on the relay port, every ping lost when it went down)
    assert ports.was_endpoint(PEER, (RELAY_IP, 40001))
    assert not ports.was_endpoint(PEER, (RELAY_IP, 40002))
    assert not ports.was_endpoint(PEER, ("198.51.100.7", 41641)), "a direct address is not a relay"


def test_the_memory_is_bounded_and_dropped_with_the_peer() -> None:
    ports, link, _ = _ports()
    for i in range(PAST_PORTS + 3):
        ports.want(PEER, 1, True)
        _ready(link, 40000 + i)
        ports.want(PEER, 1, False)
    remembered = [p for p in range(40000, 40000 + PAST_PORTS + 3) if ports.was_endpoint(PEER, (RELAY_IP, p))]
    assert remembered == list(range(40003, 40000 + PAST_PORTS + 3))
    ports.forget_others(set())
    assert not ports.was_endpoint(PEER, (RELAY_IP, 40006))

"""The path strategies as the daemon sees them: open_paths() picks one, relay state, supervision, stop.

The raw socket is replaced by a fake (socketpair-backed, so the event loop can watch it); no datagram
leaves the process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any, cast

import pytest

from meshd.nat import engine, strategy
from meshd.nat.engine import Traversal
from meshd.nat.rawport import RawPortError
from meshd.nat.strategy import PeerInfo, StaticPaths, open_paths
from meshd.paths import PathKind
from meshd.proto import disco
from meshd.proto.endpoint import Endpoint
from meshd.wg.base import WireGuardBackend
from meshd.wg.model import InterfaceState
from tests.eventually import eventually_async

PEER = PeerInfo("b", 2, "wg-b", disco.DiscoKeys(b"b" * 32).public, (("6.0.0.2", 41641),))
LAN_PEER = PeerInfo("c", 3, "wg-c", disco.DiscoKeys(b"c" * 32).public, (("192.168.1.7", 41641),))
HIDDEN_PEER = PeerInfo("d", 4, "wg-d", disco.DiscoKeys(b"d" * 32).public, ())  # no address of its own
LAN = {"eth0/192.168.1.5": ipaddress.ip_network("192.168.1.0/24")}


class FakeBackend:
    def __init__(self) -> None:
        self.endpoints: list[tuple[str, Endpoint, int | None]] = []
        self.state_calls = 0
        self.fail_state: BaseException | None = None

    async def state(self) -> InterfaceState:
        self.state_calls += 1
        if self.fail_state is not None:
            raise self.fail_state
        return InterfaceState("mesh0", None, 41641, 0, ())

    async def set_endpoint(
        self, public_key: str, endpoint: Endpoint, persistent_keepalive: int | None = None
    ) -> None:
        self.endpoints.append((public_key, endpoint, persistent_keepalive))


class FakeRawPort:
    """Stands in for RawPort: a readable fd that never has data, sends recorded."""

    opened: list[FakeRawPort] = []

    def __init__(self, port: int) -> None:
        self.port = port
        self._a, self._b = socket.socketpair()
        self.sent: list[tuple[bytes, Endpoint]] = []
        self.closed = False
        FakeRawPort.opened.append(self)

    def fileno(self) -> int:
        return self._a.fileno()

    def filenos(self) -> list[int]:
        return [self._a.fileno()]

    def send(self, payload: bytes, dst: Endpoint) -> None:
        self.sent.append((payload, dst))

    def recv(self) -> tuple[Endpoint, bytes] | None:
        return None

    def close(self) -> None:
        self.closed = True
        self._a.close()
        self._b.close()


def no_raw_socket(port: int) -> None:
    raise RawPortError("raw socket needs root or CAP_NET_RAW: [Errno 1] Operation not permitted")


async def _ignore(*args: Any) -> None:
    return None


async def _open(backend: FakeBackend, *, relay_up: bool, **kw: Any) -> strategy.PathStrategy:
    args: dict[str, Any] = {
        "backend": cast(WireGuardBackend, backend),
        "node_seed": b"a" * 32,
        "port": 41641,
        "relay_endpoint": lambda key: ("127.0.0.1", 40000),
        "own_key": lambda: "wg-a",
        "on_candidates": _ignore,
        "send_signal": _ignore,
        "relay_up": relay_up,
    }
    args.update(kw)
    return await open_paths(**args)


@pytest.fixture
def fake_raw(monkeypatch: pytest.MonkeyPatch) -> list[FakeRawPort]:
    FakeRawPort.opened = []
    monkeypatch.setattr(engine, "RawPort", FakeRawPort)
    return FakeRawPort.opened


async def test_without_a_raw_socket_open_paths_falls_back_to_static_paths_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engine, "RawPort", no_raw_socket)
    with caplog.at_level(logging.WARNING, logger="meshd.nat"):
        paths = await _open(FakeBackend(), relay_up=True)
    try:
        assert isinstance(paths, StaticPaths) and not paths.probing
        assert "no probes on the WireGuard port" in caplog.text
        paths.set_local(LAN)
        paths.set_peers([HIDDEN_PEER, LAN_PEER])
        assert paths.path("wg-d").path is PathKind.RELAY, "the factory passed the relay's state on"
        assert paths.endpoint_for("wg-c", LAN_PEER.candidates) == ("192.168.1.7", 41641)
        paths.relay_changed(False)
        assert paths.path("wg-d").path is PathKind.NONE
        # the same calls as on traversal (the daemon never branches): without the raw socket no UDP relay
        # port is ever asked for, so relayed peers stay on the TCP relay's proxy
        asked: list[tuple[str, bool]] = []
        paths.relay_ports(lambda key, relayed: asked.append((key, relayed)), lambda key, ep: False)
        paths.relay_moved("wg-d")
        assert asked == [] and paths.endpoint_for("wg-d", HIDDEN_PEER.candidates) == ("127.0.0.1", 40000)
    finally:
        await paths.close()


async def test_traversal_start_raises_when_the_raw_socket_cannot_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "RawPort", no_raw_socket)
    t = Traversal(
        backend=cast(WireGuardBackend, FakeBackend()),
        node_seed=b"a" * 32,
        port=1,
        send_signal=_ignore,
        on_candidates=_ignore,
    )
    with pytest.raises(RawPortError):
        await t.start()
    assert not t.probing
    await t.close()


async def test_with_a_raw_socket_open_paths_gives_the_probing_traversal(fake_raw: list[FakeRawPort]) -> None:
    paths = await _open(FakeBackend(), relay_up=False)
    try:
        assert isinstance(paths, Traversal) and paths.probing
        # the engine sets endpoints itself, except the relay proxy a new peer of the lower key ("wg-a" <
        # "wg-b") is added with (meshd.nat.endpoints); a higher key than ours gets none
        assert paths.endpoint_for("wg-b", PEER.candidates) == ("127.0.0.1", 40000)
        assert paths.endpoint_for("wg-0", ()) is None
    finally:
        await paths.close()
    assert fake_raw[0].closed and not paths.probing


async def test_a_new_peer_is_none_while_the_relay_is_down_then_relay(fake_raw: list[FakeRawPort]) -> None:
    backend = FakeBackend()
    paths = await _open(backend, relay_up=False)
    try:
        paths.set_peers([PEER])
        assert paths.path("wg-b").path is PathKind.NONE, "a proxy endpoint exists, but no relay link is up"
        paths.relay_changed(True)
        assert paths.path("wg-b").path is PathKind.RELAY
        assert paths.path("wg-unknown").path is PathKind.NONE
        # the first decision (the relay proxy) reaches WireGuard; we have the lower key, so we initiate
        await eventually_async(lambda: backend.endpoints, within=2.0, what="relay endpoint set")
        assert backend.endpoints[0] == ("wg-b", ("127.0.0.1", 40000), 25)
        assert paths.keepalive_on("wg-b")
        assert paths.endpoint_for("wg-b", PEER.candidates) is None, "from now on WireGuard keeps its own"
    finally:
        await paths.close()


async def test_a_failing_loop_is_logged_and_restarted_not_lost(
    fake_raw: list[FakeRawPort], caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    backend.fail_state = RuntimeError("netlink went away")
    paths = await _open(backend, relay_up=True)
    try:
        with caplog.at_level(logging.ERROR, logger="meshd.supervise"):
            await eventually_async(
                lambda: backend.state_calls >= 2, within=5.0, what="handshake loop restarted"
            )
        assert "task nat-handshakes failed" in caplog.text
    finally:
        await paths.close()


async def test_close_is_prompt_cancels_sends_in_flight_and_is_idempotent(fake_raw: list[FakeRawPort]) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hanging_announce(cands: list[str]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    paths = await _open(FakeBackend(), relay_up=True, on_candidates=hanging_announce)
    paths.set_local(LAN)
    await asyncio.wait_for(started.wait(), 2.0)
    t0 = time.monotonic()
    await paths.close()
    assert time.monotonic() - t0 < 1.2
    assert cancelled.is_set()
    await paths.close()  # a second close is a no-op
    assert not paths.probing

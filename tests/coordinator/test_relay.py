"""The embedded relay on the coordinator's own port: Upgrade and WebSocket transports next to the API,
tickets, routing between real meshd relay clients and their UDP proxies, revocation, bad frames, queues."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from nacl.signing import SigningKey

from coordinator.app import create_app
from coordinator.relay import hub as relay_hub
from coordinator.relay import service as relay_service
from coordinator.relay.front import install
from coordinator.settings import Settings
from meshd.control import ControlClient, ControlError, Enrollment
from meshd.proto import relay, relayfeed, ticket
from meshd.proto.encoding import b64encode
from meshd.proto.netmap import RelayRegion
from meshd.relay import link as rlink
from meshd.relay.manager import RelayManager
from tests.coordinator.conftest import Coord
from tests.eventually import eventually_async

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def relayed(coord: Coord, settings: Settings) -> AsyncIterator[Coord]:
    """The coordinator served by uvicorn on loopback with the relay front installed (as `serve` does)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings, core=coord.core)
    app.state.relay.start()
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    install(config, app.state.relay.hub)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually_async(lambda: server.started, within=5, what="uvicorn started")
        c = Coord(coord.core, coord.api, coord.admin, coord.transport, f"http://127.0.0.1:{port}")
        c.relay = app.state.relay  # type: ignore[attr-defined]
        yield c
    finally:
        await app.state.relay.stop()
        server.should_exit = True
        await coord.core.hub.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()


@dataclass
class Node:
    client: ControlClient
    enrollment: Enrollment

    @property
    def key(self) -> bytes:
        return self.client.keys.wg_public

    async def grant(self, region_id: int = 1) -> ticket.Grant:
        return await self.client.relay_ticket(region_id)

    async def ticket(self, region_id: int = 1) -> bytes:
        return (await self.grant(region_id)).ticket.encode()

    def sign(self, message: bytes) -> bytes:
        return SigningKey(self.client.keys.node_private).sign(message).signature

    async def connect(self, url: str, region_id: int = 1, **kw: Any) -> rlink.RelayLink:
        """A relay link for this node with a fresh ticket for `region_id` (keywords go to connect)."""
        kw.setdefault("on_packet", lambda s, p: None)
        kw.setdefault("home", True)
        tk = kw.pop("ticket", None) or await self.ticket(region_id)
        return await rlink.connect(url, self.key, tk, sign=self.sign, region_id=region_id, **kw)


async def enroll(c: Coord, name: str) -> Node:
    keys_client, e = await c.enroll(name)
    client = ControlClient(c.url, keys_client.keys, e.node_id)
    return Node(client, e)


async def link(c: Coord, n: Node, inbox: asyncio.Queue[tuple[bytes, bytes]], **kw: Any) -> rlink.RelayLink:
    return await n.connect(c.url, on_packet=lambda s, p: inbox.put_nowait((s, p)), **kw)


async def test_upgrade_relays_packets_and_the_api_still_answers_on_the_same_port(relayed: Coord) -> None:
    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    inbox_a: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    inbox_b: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    la = await link(relayed, a, inbox_a)
    lb = await link(relayed, b, inbox_b, transports=("websocket",))
    assert (la.transport, lb.transport) == ("upgrade", "websocket")
    assert la.info.region == "default"
    la.send_packet(b.key, b"hello b")
    assert await asyncio.wait_for(inbox_b.get(), 2) == (a.key, b"hello b")
    lb.send_packet(a.key, b"x" * 1400)
    assert await asyncio.wait_for(inbox_a.get(), 2) == (b.key, b"x" * 1400)
    assert await la.ping() < 1.0
    async with httpx.AsyncClient(base_url=relayed.url) as http:
        assert (await http.get("/healthz")).status_code == 200

        async def metrics() -> str | None:
            text = (await http.get("/metrics")).text
            # packet counters are flushed in batches, at least every 0.2 s
            return text if 'relay_packets_total{region="default"} 2.0' in text else None

        text = await eventually_async(metrics, within=3, what="the packet counters were flushed")
    assert 'relay_clients{region="default"} 2.0' in text
    la.close()
    lb.close()

    async def audit() -> list[dict[str, object]] | None:
        entries: list[dict[str, object]] = (await relayed.admin.get("/admin/audit")).json()
        closes = [x for x in entries if x["action"] == "relay.session.close"]
        return entries if len(closes) == 2 else None

    entries = await eventually_async(audit, within=3, what="both sessions audited as closed")
    assert [x["action"] for x in entries].count("relay.session.open") == 2
    close = next(x for x in entries if x["action"] == "relay.session.close" and x["object"] == "node:a")
    assert close["details"]["tx_bytes"] == 1400 and close["details"]["rx_bytes"] == 7


async def test_home_region_is_published_as_relay_home(relayed: Coord) -> None:
    a = await enroll(relayed, "a")
    relayed.core.state.put_peer(
        dataclasses.replace(relayed.core.state.peers[a.enrollment.node_id], relay_home=None)
    )
    inbox: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    la = await link(relayed, a, inbox)
    await eventually_async(
        lambda: relayed.core.state.peers[a.enrollment.node_id].relay_home == 1,
        within=2,
        what="relay_home is 1",
    )
    la.close()


async def test_ticket_for_another_key_or_forged_is_refused(relayed: Coord) -> None:
    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    with pytest.raises(rlink.RelayLinkError, match="another WireGuard key"):
        await b.connect(relayed.url, ticket=await a.ticket())
    with pytest.raises(rlink.RelayLinkError, match="malformed ticket"):
        await a.connect(relayed.url, ticket=b"forged")


async def test_a_ticket_is_only_issued_for_a_region_in_the_map(relayed: Coord) -> None:
    a = await enroll(relayed, "a")
    with pytest.raises(ControlError, match="no relay region 9"):
        await a.grant(9)


async def test_removed_node_is_dropped_within_a_second(relayed: Coord) -> None:
    a = await enroll(relayed, "a")
    inbox: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    la = await link(relayed, a, inbox)
    ticket = await a.ticket()
    loop = asyncio.get_running_loop()
    start = loop.time()
    r = await relayed.admin.delete("/admin/nodes/a")
    assert r.status_code == 204, r.text
    reason = await asyncio.wait_for(asyncio.shield(la.closed), 1.0)
    assert loop.time() - start < 1.0
    assert "removed" in reason
    with pytest.raises(rlink.RelayLinkError, match="removed or expired"):  # its unexpired ticket is dead too
        await a.connect(relayed.url, ticket=ticket)


async def raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(relay.upgrade_request("x"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    [frame] = relay.FrameDecoder().feed(await reader.readexactly(relay.HEADER_LEN + 36))
    assert frame.type == relay.FrameType.SERVER_CHALLENGE  # the relay speaks first
    return reader, writer


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"\x7f\x00\x00\x00\x00", "unknown frame type 0x7f"),
        (relay.HEADER.pack(relay.FrameType.SEND_PACKET, relay.MAX_FRAME + 1), "outside"),
        (relay.encode(relay.FrameType.PING, b"12345678"), "PING before CLIENT_HELLO"),
        (relay.HEADER.pack(relay.FrameType.SEND_PACKET, 100) + b"short", "stream ended inside a frame"),
        (relay.encode(relay.FrameType.RECV_PACKET, bytes(40)), "not a client frame"),
    ],
)
async def test_bad_frames_close_only_that_connection_with_a_logged_reason(
    relayed: Coord, garbage: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "coordinator.relay")
    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    inbox_a: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    inbox_b: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    la, lb = await link(relayed, a, inbox_a), await link(relayed, b, inbox_b)
    if reason == "not a client frame":
        bad = await link(relayed, await enroll(relayed, "c"), asyncio.Queue())
        bad._impl.write(garbage)
        await asyncio.wait_for(asyncio.shield(bad.closed), 2)
    else:
        reader, writer = await raw(relayed.url)
        writer.write(garbage)
        if reason.startswith("stream ended"):
            writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 2)  # the relay closes the connection
        assert data == b"" or data.startswith(bytes([relay.FrameType.CLOSE]))
        writer.close()
    await eventually_async(lambda: reason in caplog.text, within=2, what=f"{reason!r} logged")
    la.send_packet(b.key, b"still working")
    assert await asyncio.wait_for(inbox_b.get(), 2) == (a.key, b"still working")
    la.close()
    lb.close()


async def test_slow_client_loses_oldest_packets_and_nobody_stalls(
    relayed: Coord, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_hub, "QUEUE_FRAMES", 50)
    a, b, c = await enroll(relayed, "a"), await enroll(relayed, "b"), await enroll(relayed, "c")
    inbox_c: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    la = await link(relayed, a, asyncio.Queue())
    lb = await link(relayed, b, asyncio.Queue())
    lc = await link(relayed, c, inbox_c)
    hub = relayed.relay.hub  # type: ignore[attr-defined]
    slow = hub.clients[b.key]
    slow.pause()  # b's socket is "full": everything for b now goes through its bounded queue
    for i in range(200):
        la.send_packet(b.key, i.to_bytes(4, "big"))
    la.send_packet(c.key, b"for c")
    assert await asyncio.wait_for(inbox_c.get(), 2) == (a.key, b"for c")
    assert slow.drops == 150
    assert [int.from_bytes(f[-4:], "big") for f in slow.queue] == list(range(150, 200))  # oldest dropped
    for x in (la, lb, lc):
        x.close()


async def test_slow_client_queue_is_bounded_in_bytes(relayed: Coord, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_hub, "QUEUE_BYTES", 10 * (relay.HEADER_LEN + relay.KEY_LEN + 1000))
    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    la = await link(relayed, a, asyncio.Queue())
    lb = await link(relayed, b, asyncio.Queue())
    hub = relayed.relay.hub  # type: ignore[attr-defined]
    slow = hub.clients[b.key]
    slow.pause()
    for i in range(30):
        la.send_packet(b.key, i.to_bytes(4, "big") + bytes(996))
    await eventually_async(lambda: slow.drops == 20, within=2, what="20 oldest dropped")
    assert len(slow.queue) == 10 and slow.queued == relay_hub.QUEUE_BYTES
    assert [int.from_bytes(f[37:41], "big") for f in slow.queue] == list(range(20, 30))
    slow.resume()
    assert slow.queued == 0 and not slow.queue
    la.close()
    lb.close()


async def test_relay_manager_proxies_udp_between_two_wireguard_ports(relayed: Coord) -> None:
    """Two managers stand in for two daemons; two UDP sockets stand in for the WireGuard ports."""
    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    wg_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (wg_a, wg_b):
        s.bind(("127.0.0.1", 0))
        s.settimeout(2)
    states: list[bool] = []
    region = RelayRegion(1, "default", relayed.url, 0)
    ma = RelayManager(
        wg_key=a.key, wg_port=wg_a.getsockname()[1], tickets=a.client.relay_ticket, on_state=states.append
    )
    mb = RelayManager(wg_key=b.key, wg_port=wg_b.getsockname()[1], tickets=b.client.relay_ticket)
    try:
        for m, other in ((ma, b), (mb, a)):
            m.start()
            m.set_regions([region])
            m.set_peers([(b64encode(other.key), 1)])
        # relay first: the endpoint exists before the link is up; what is sent now is delivered later
        ep_b_at_a = ma.endpoint(b64encode(b.key))
        assert ep_b_at_a is not None and ep_b_at_a[0] == "127.0.0.1"
        await eventually_async(lambda: mb.up, within=5, what="b is connected (the relay delivers only then)")
        await asyncio.to_thread(wg_a.sendto, b"handshake initiation", ep_b_at_a)
        data, src = await asyncio.to_thread(wg_b.recvfrom, 2000)
        assert data == b"handshake initiation"
        assert src == mb.endpoint(b64encode(a.key))  # b's WireGuard sees a at a's proxy on b's side
        await asyncio.to_thread(wg_b.sendto, b"response", src)
        data, src = await asyncio.to_thread(wg_a.recvfrom, 2000)
        assert (data, src) == (b"response", ep_b_at_a)
        assert states == [True] and ma.up and ma.home_name() == "default"
        [st] = ma.status()
        assert st.connected and st.home
    finally:
        await ma.close()
        await mb.close()
        wg_a.close()
        wg_b.close()


async def test_small_packets_for_a_node_that_connects_a_moment_later_are_delivered(relayed: Coord) -> None:
    """Two daemons reach the relay some hundred ms apart: the first one's WireGuard handshake must not be
    lost (WireGuard would wait 5 s to retry), so the relay holds small packets for a short while."""
    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    inbox_a: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    inbox_b: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    la = await link(relayed, a, inbox_a)
    la.send_packet(b.key, b"\x01" + bytes(147))  # the size of a handshake initiation
    la.send_packet(b.key, b"y" * 1400)  # data is not held
    await la.ping()  # frames are handled in order: the relay has seen both packets
    lb = await link(relayed, b, inbox_b)
    assert await asyncio.wait_for(inbox_b.get(), 2) == (a.key, b"\x01" + bytes(147))
    la.send_packet(b.key, b"after")  # anything held would arrive before this
    assert await asyncio.wait_for(inbox_b.get(), 2) == (a.key, b"after")
    la.close()
    lb.close()


async def test_a_connection_that_never_says_hello_is_closed(
    relayed: Coord, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unauthenticated connections must not pile up: no CLIENT_HELLO within HELLO_TIMEOUT, closed."""
    monkeypatch.setattr(relay_hub, "HELLO_TIMEOUT", 0.3)
    reader, writer = await raw(relayed.url)
    data = await asyncio.wait_for(reader.read(), 3)  # the relay closes the connection
    [frame] = relay.FrameDecoder().feed(data)
    assert frame.type == relay.FrameType.CLOSE and b"no CLIENT_HELLO" in frame.payload
    writer.close()


async def test_feed_refuses_bad_messages_and_keeps_going(
    relayed: Coord, caplog: pytest.LogCaptureFixture
) -> None:
    from websockets.asyncio.client import connect

    secret = (relayed.core.settings.state_dir / "relay.secret").read_text().strip()
    url = relay.websocket_url(relayed.url, relayfeed.FEED_PATH)
    async with connect(url, additional_headers={"Authorization": f"Bearer {secret}"}) as ws:
        keys = relayfeed.decode_to_relay(await ws.recv())
        assert keys == relayfeed.Keys(tuple(relayed.core.keys.trusted))
        assert isinstance(relayfeed.decode_to_relay(await ws.recv()), relayfeed.Valid)
        await ws.send('{"type": "region", "id": "two"}')
        await ws.send(b"\xff binary junk")
        await ws.send(relayfeed.encode(relayfeed.Revoke(1, "a relay may not revoke")))
        region = RelayRegion(7, "seven", "http://127.0.0.1:1", 0)
        await ws.send(relayfeed.encode(relayfeed.Region(region)))
        await eventually_async(lambda: region in relayed.core.state.relays, within=3, what="region 7 joined")
    assert caplog.text.count("relay feed: bad message") == 3


async def test_feed_with_a_wrong_secret_is_refused(relayed: Coord) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    url = relay.websocket_url(relayed.url, relayfeed.FEED_PATH)
    with pytest.raises(InvalidStatus):
        async with connect(url, additional_headers={"Authorization": "Bearer wrong"}):
            pass


async def test_background_effects_are_bounded_but_revocations_never_dropped(
    relayed: Coord, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storm of sessions with a slow database must not pile up audit tasks without bound."""
    monkeypatch.setattr(relay_service, "MAX_PENDING", 2)
    svc = relayed.relay  # type: ignore[attr-defined]
    release = asyncio.Event()
    ran: list[str] = []

    async def effect(name: str) -> None:
        await release.wait()
        ran.append(name)

    for name in ("audit 1", "audit 2", "audit 3"):
        svc._spawn(effect(name))
    svc._spawn(effect("revoke"), must=True)
    assert svc.skipped == 1
    release.set()
    await eventually_async(lambda: len(ran) == 3, within=2, what="the kept effects ran")
    assert sorted(ran) == ["audit 1", "audit 2", "revoke"]

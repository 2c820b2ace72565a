"""The dashboard's relays page shows real relay traffic: packets through the embedded relay's TCP
sessions and its UDP relay ports, a standalone region's ended sessions as its feed reported them, and
the peer relays serving pairs."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Callable

import httpx
import pytest

from coordinator import nodes, peerrelays
from coordinator.app import create_app
from coordinator.relay import udp as relay_udp
from coordinator.relay.standalone import Standalone
from coordinator.relay.usage import FeedUsage
from meshd import pathreport
from meshd.pathreport import Facts, PathEntry
from meshd.proto import relay, relayport
from meshd.proto.relayfeed import SessionOpen, SessionRecord
from tests.coordinator.conftest import Coord
from tests.coordinator.test_dashboard import log_in, token_of
from tests.coordinator.test_relay import enroll, relayed  # noqa: F401 - fixture
from tests.coordinator.test_relay_standalone import region2  # noqa: F401 - fixture
from tests.eventually import eventually_async

pytestmark = pytest.mark.timeout(60)


def cells(html: str, region_id: int) -> dict[str, str]:
    """The relays page's figures for one region: column class -> data-value."""
    row = re.search(rf'<tr id="region-{region_id}".*?</tr>', html, re.S)
    assert row is not None, html
    return dict(re.findall(r'<td class="([a-z-]+)[^"]*" data-value="([^"]*)"', row[0]))


async def relays_page(c: Coord) -> str:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(c.core.settings, core=c.core)), base_url="https://coord"
    ) as browser:
        assert (await log_in(browser, await token_of(c, "read"))).status_code == 303
        page = await browser.get("/admin/relays")
        assert page.status_code == 200, page.text
        return page.text


def two_free_udp_ports() -> range:
    """Two adjacent free loopback UDP ports (for the relay's port range)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            low = s.getsockname()[1]
        if low >= 65535:
            continue
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
            ):
                a.bind(("127.0.0.1", low))
                b.bind(("127.0.0.1", low + 1))
        except OSError:
            continue
        return range(low, low + 2)
    raise AssertionError("no two adjacent free UDP ports")


async def test_the_embedded_regions_tcp_and_udp_relay_traffic_shows(relayed: Coord) -> None:  # noqa: F811
    hub = relayed.relay.hub  # type: ignore[attr-defined]
    relay_udp.start(hub, "127.0.0.1", two_free_udp_ports())  # as `serve --relay-udp-ports` does
    before = cells(await relays_page(relayed), 1)
    assert before["tcp-packets"] == "0" and before["udp-allocations"] == "0" and before["homed"] == "0"

    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    inbox: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    frames: dict[str, asyncio.Queue[relay.Frame]] = {"a": asyncio.Queue(), "b": asyncio.Queue()}
    la = await a.connect(relayed.url)
    lb = await b.connect(relayed.url, on_packet=lambda s, p: inbox.put_nowait((s, p)))
    assert la.udp_ports and lb.udp_ports
    la.on_port, lb.on_port = frames["a"].put_nowait, frames["b"].put_nowait
    try:
        # TCP: 3 packets of 1000 bytes from a to b through the relay session
        for _ in range(3):
            la.send_packet(b.key, b"t" * 1000)
        for _ in range(3):
            assert await asyncio.wait_for(inbox.get(), 3) == (a.key, b"t" * 1000)

        # UDP: both ask for a port pair, bind from their "WireGuard" sockets, a sends b 4 datagrams
        la.request_port(b.key)
        lb.request_port(a.key)
        grants = {}
        for side in ("a", "b"):
            while side not in grants:
                f = await asyncio.wait_for(frames[side].get(), 3)
                if f.type == relay.FrameType.PORT_GRANT:
                    grants[side] = relayport.decode_grant(f.payload)
        wg = {side: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for side in ("a", "b")}
        for s in wg.values():
            s.bind(("127.0.0.1", 0))
            s.settimeout(3)
        try:
            for side, g in grants.items():
                wg[side].sendto(relayport.encode_bind(g.secret, g.port, 1), ("127.0.0.1", g.port))
            datagram = b"\x04\x00\x00\x00" + b"u" * 796  # a WireGuard data message's shape, 800 bytes

            async def delivered() -> bool:
                wg["a"].sendto(datagram, ("127.0.0.1", grants["a"].port))
                try:
                    return await asyncio.to_thread(wg["b"].recv, 2048) == datagram
                except TimeoutError:
                    return False

            await eventually_async(delivered, within=10, what="a datagram relayed through the UDP ports")
            for _ in range(3):
                wg["a"].sendto(datagram, ("127.0.0.1", grants["a"].port))
                assert await asyncio.to_thread(wg["b"].recv, 2048) == datagram

            async def shown() -> dict[str, str] | None:  # the counters are sampled every tick (0.2 s)
                got = cells(await relays_page(relayed), 1)
                return got if int(got["udp-bytes"]) >= 4 * 800 and got["homed"] == "2" else None

            row = await eventually_async(shown, within=10, what="the relays page shows the UDP bytes")
        finally:
            for s in wg.values():
                s.close()
        assert row["tcp-connections"] == "2"
        assert int(row["tcp-packets"]) == 3 and int(row["tcp-bytes"]) == 3000
        assert row["udp-allocations"] == "1"
        assert int(row["udp-bytes"]) % 800 == 0  # only whole datagrams of ours were counted
    finally:
        la.close()
        lb.close()


async def test_a_standalone_regions_ended_sessions_show_as_its_feed_reported_them(
    relayed: Coord,  # noqa: F811
    region2: Standalone,  # noqa: F811
) -> None:
    row = cells(await relays_page(relayed), 2)
    assert row["tcp-packets"] == "not reported" and row["udp-allocations"] == "not reported"
    assert row["tcp-bytes"] == "0"
    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    inbox: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    la = await a.connect(region2.url, region_id=2)
    lb = await b.connect(region2.url, region_id=2, on_packet=lambda s, p: inbox.put_nowait((s, p)))
    for _ in range(2):
        la.send_packet(b.key, b"s" * 700)
        assert await asyncio.wait_for(inbox.get(), 3) == (a.key, b"s" * 700)
    la.close()
    lb.close()

    async def reported() -> dict[str, str] | None:
        got = cells(await relays_page(relayed), 2)
        return got if got["tcp-bytes"] == "1400" else None

    row = await eventually_async(reported, within=10, what="the ended sessions' bytes reached the page")
    assert row["tcp-connections"] == "not reported" and row["udp-bytes"] == "0"
    assert "region2: ended sessions its feed reported" in await relays_page(relayed)


async def test_peer_relays_serving_pairs_show(coord: Coord) -> None:
    """The planner (as `serve` runs it) picks hop for the relayed pair (a, b) from their path reports."""
    key = await coord.user_and_key(reusable=True)
    (a, ea), (b, eb), (h, eh) = [await coord.enroll(n, key) for n in ("a", "b", "hop")]
    assert (await coord.admin.post("/admin/nodes/hop/relay", json={"on": True})).status_code == 200
    await nodes.set_endpoints(coord.core, eh.node_id, None, True)  # online, as with an open stream
    page = await relays_page(coord)
    assert "No peer relay serves a pair now." in page
    for me, peer in ((a, eb), (b, ea)):
        summary = (PathEntry(peer.node_id, "relay", "tcp", None), PathEntry(eh.node_id, "direct", None, 2.0))
        assert await pathreport.send(me, summary, Facts(True, "EDM", None, relay_ms=90.0)) == 2
    assert await pathreport.send(h, (), Facts(True, "EIM", None, serve=("203.0.113.7", 41800, 41899))) == 0
    planner = asyncio.create_task(peerrelays.run(coord.core))
    try:

        async def served() -> str | None:
            html = await relays_page(coord)
            return html if 'id="peer-relay-hop"' in html else None

        page = await eventually_async(served, within=10, what="the relays page shows hop serving a and b")
    finally:
        planner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await planner
    assert re.search(r'<tr id="peer-relay-hop" data-pairs="1">.*?a ↔ b', page, re.S), page


def test_feed_usage_sums_ended_sessions_per_region_and_transport() -> None:
    usage = FeedUsage()
    record: Callable[..., SessionRecord] = lambda region, transport, rx: SessionRecord(  # noqa: E731
        1, b"k" * 32, region, transport, 0.0, 1.0, rx, 0, 0, "closed"
    )
    usage.note(SessionOpen(1, "two", "upgrade"))
    usage.note(record("two", "upgrade", 100))
    usage.note(record("two", "websocket", 50))
    usage.note(record("two", "udp", 800))
    usage.note(record("two", "udp", 1600))
    usage.note(record("three", "udp", 7))
    tcp, udp = usage.of("two", "tcp"), usage.of("two", "udp")
    assert tcp is not None and (tcp.opened, tcp.closed, tcp.bytes) == (1, 2, 150)
    assert udp is not None and (udp.opened, udp.closed, udp.bytes) == (0, 2, 2400)
    assert usage.of("four", "tcp") is None

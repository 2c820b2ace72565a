"""A standalone relay region next to the embedded one: it joins the relay map over its feed, accepts the
coordinator's tickets, drops removed nodes within 1 s, and a client picks its home region by latency and
reaches a peer homed on the other region through an on-demand link."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import uvicorn

from coordinator.relay.front import install
from coordinator.relay.standalone import RelayOptions, Standalone
from meshd.proto.encoding import b64encode
from meshd.relay.manager import RelayManager
from tests.coordinator.conftest import Coord
from tests.coordinator.test_relay import enroll, relayed  # noqa: F401 - fixture
from tests.eventually import eventually_async

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def region2(relayed: Coord) -> AsyncIterator[Standalone]:  # noqa: F811
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    secret = (relayed.core.settings.state_dir / "relay.secret").read_text().strip()
    # TEST-ONLY pong delay: region2 answers latency probes 150 ms late (tc netem is not available here)
    opts = RelayOptions(("127.0.0.1", port), relayed.url, secret, 2, "region2", pong_delay=0.15)
    relay = Standalone(opts)
    config = uvicorn.Config(relay.app(), log_level="warning", lifespan="off")
    install(config, relay.hub)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    tasks = [
        asyncio.create_task(server.serve(sockets=[sock])),
        asyncio.create_task(relay.feed_loop()),
        asyncio.create_task(relay.tick_loop()),
    ]
    try:
        await asyncio.wait_for(relay.feed_up.wait(), 5)
        await eventually_async(lambda: len(relayed.core.state.relays) == 2, within=2, what="region2 joined")
        yield relay
    finally:
        relay.hub.close_all("test over")
        server.should_exit = True
        for t in tasks[1:]:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(tasks[0], 5)
        sock.close()


async def test_region_joins_the_relay_map_and_drops_removed_nodes_within_1s(
    relayed: Coord,  # noqa: F811
    region2: Standalone,
) -> None:
    [r1, r2] = relayed.core.state.relays
    assert (r1.name, r2.name, r2.id, r2.url) == ("default", "region2", 2, region2.url)
    a = await enroll(relayed, "a")
    la = await a.connect(region2.url, region_id=2)
    await eventually_async(  # attach -> relay_home published by the coordinator
        lambda: relayed.core.state.peers[a.enrollment.node_id].relay_home == 2, within=2, what="relay_home 2"
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert (await relayed.admin.delete("/admin/nodes/a")).status_code == 204
    reason = await asyncio.wait_for(asyncio.shield(la.closed), 1.0)
    assert loop.time() - t0 < 1.0 and "removed" in reason

    async def audited() -> bool:  # the standalone relay's session, audited by the coordinator
        actions = [x["action"] for x in (await relayed.admin.get("/admin/audit")).json()]
        return "relay.session.close" in actions

    await eventually_async(audited, within=3, what="the session close was audited")


async def test_home_by_latency_and_cross_region_delivery(relayed: Coord, region2: Standalone) -> None:  # noqa: F811
    a, b = await enroll(relayed, "a"), await enroll(relayed, "b")
    wg_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (wg_a, wg_b):
        s.bind(("127.0.0.1", 0))
        s.settimeout(3)
    ma = RelayManager(wg_key=a.key, wg_port=wg_a.getsockname()[1], tickets=a.client.relay_ticket)
    mb = RelayManager(wg_key=b.key, wg_port=wg_b.getsockname()[1], tickets=b.client.relay_ticket)
    try:
        ma.start()
        mb.start()
        # the fixture's coordinator listens on port 0 in its settings: give region 1 its real URL
        regions = [replace(r, url=relayed.url) if r.id == 1 else r for r in relayed.core.state.relays]
        ma.set_regions(regions)  # both regions: a measures and picks the faster
        mb.set_regions([r for r in regions if r.id == 2])  # b can only use region2
        await eventually_async(
            lambda: ma.up and mb.up and relayed.core.state.peers[b.enrollment.node_id].relay_home == 2,
            within=7.5,
            what="a and b are up, b homed on region2",
        )
        assert ma.home_name() == "default", [s for s in ma.status()]
        rtts = {s.name: s.rtt_ms for s in ma.status()}
        assert rtts["region2"] is not None and rtts["default"] is not None
        assert rtts["region2"] > rtts["default"] + 100
        ma.set_peers([(b64encode(b.key), 2)])  # the map says: b is homed on region2
        mb.set_peers([(b64encode(a.key), 1)])
        ep = ma.endpoint(b64encode(b.key))
        assert ep is not None
        await eventually_async(
            lambda: any(s.name == "region2" and s.connected for s in ma.status()),
            within=2,
            what="a has an on-demand link to region2",
        )
        await asyncio.to_thread(wg_a.sendto, b"cross-region", ep)
        data, src = await asyncio.to_thread(wg_b.recvfrom, 2000)
        assert data == b"cross-region"
        await asyncio.to_thread(wg_b.sendto, b"and back", src)
        data, _ = await asyncio.to_thread(wg_a.recvfrom, 2000)
        assert data == b"and back"
    finally:
        await ma.close()
        await mb.close()
        wg_a.close()
        wg_b.close()

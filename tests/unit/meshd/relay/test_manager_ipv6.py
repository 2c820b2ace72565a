"""An IPv6-only node (issue 15): the region URL names an IPv4 address it cannot reach; the relay client
connects at the same URL with the region's IPv6 address instead."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from meshd.proto.encoding import b64encode
from meshd.proto.netmap import RelayRegion
from meshd.proto.ticket import Grant
from meshd.relay.manager import RelayManager
from tests.eventually import eventually_async
from tests.unit.meshd.relay.fakerelay import FakeRelay

pytestmark = pytest.mark.timeout(30)


async def tickets(region_id: int) -> Grant:
    return Grant("ticket", time.time() + 3600, lambda m: bytes(64))


@pytest.fixture
async def relay6() -> AsyncIterator[FakeRelay]:
    """The scripted relay on ::1 only: at 127.0.0.1 the same port refuses."""
    fake = FakeRelay()
    try:
        fake.server = await asyncio.start_server(fake.handle, "::1", 0, family=socket.AF_INET6)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        yield fake
    finally:
        fake.server.close()
        await fake.server.wait_closed()


async def test_relay_reached_at_the_regions_ipv6_address(relay6: FakeRelay) -> None:
    assert relay6.server is not None
    port = relay6.server.sockets[0].getsockname()[1]
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg.bind(("127.0.0.1", 0))
    m = RelayManager(wg_key=bytes(32), wg_port=wg.getsockname()[1], tickets=tickets)
    m.start()
    try:
        m.set_regions([RelayRegion(1, "fake", f"http://127.0.0.1:{port}", 0, ipv6="::1")])
        m.set_peers([(b64encode(bytes(range(32))), 1)])
        await eventually_async(lambda: m.up, within=10, what="the relay link is up over IPv6")
        assert relay6.hellos_seen, "the hello went to the IPv6 relay"
    finally:
        await m.close()
        wg.close()

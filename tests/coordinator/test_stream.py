"""The network map stream: full map, deltas within 1 s, reconnect with `since`, revocation, signalling."""

from __future__ import annotations

import asyncio
import time

import pytest

from meshd.control import ControlClient, ControlError, Enrollment, NodeKeys
from meshd.proto import netmap
from tests.coordinator.conftest import Coord


async def enroll_live(live: Coord, hostname: str, key: str) -> ControlClient:
    client = ControlClient(live.url, NodeKeys.generate())
    result = await client.register(hostname, auth_key=key)
    assert isinstance(result, Enrollment)
    return client


async def wait_until(stream_: object, predicate: object, within: float) -> netmap.NetMap:
    """Receive messages until predicate(map) holds; fail after `within` seconds."""
    from meshd.control import MapStream

    assert isinstance(stream_, MapStream)
    deadline = time.monotonic() + within
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"condition not met within {within} s; map: {stream_.map}")
        try:
            m = await stream_.next_map(within=remaining)
        except TimeoutError:
            continue
        if predicate(m):  # type: ignore[operator]
            return m


def names(m: netmap.NetMap) -> set[str]:
    return {p.name for p in m.peers}


async def test_a_new_node_reaches_two_connected_nodes_within_one_second(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    async with a.stream() as sa, b.stream() as sb:
        assert names(await sa.next_map(within=5)) == {"b"}
        assert names(await sb.next_map(within=5)) == {"a"}
        await asyncio.sleep(0.2)  # let the "online" deltas settle
        start = time.monotonic()
        c = await enroll_live(live, "c", key)
        await asyncio.gather(
            wait_until(sa, lambda m: "c" in names(m), 1.0), wait_until(sb, lambda m: "c" in names(m), 1.0)
        )
        assert time.monotonic() - start < 1.0
        peer_c = next(p for p in sa.map.peers if p.name == "c")  # type: ignore[union-attr]
        assert peer_c.node_id == c.node_id and peer_c.cert
    for client in (a, b, c):
        await client.aclose()


async def test_reconnect_with_since_gets_only_what_was_missed(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    async with a.stream() as sa:
        first = await sa.recv(within=5)
        assert isinstance(first, netmap.MapMessage)
        await asyncio.sleep(0.2)
        while True:  # drain the online flip of a itself
            try:
                await sa.recv(within=0.3)
            except TimeoutError:
                break
        seen = sa.map
    assert seen is not None
    await asyncio.sleep(0.2)
    r = await live.admin.post("/admin/nodes/b/rename", json={"new_name": "bee"})
    assert r.status_code == 204
    async with a.stream(since=seen.version) as sa:
        msg = await sa.recv(within=5)
        assert isinstance(msg, netmap.DeltaMessage), "a reconnect with since=V must not resend the full map"
        d = msg.delta
        assert d.from_version == seen.version
        assert [p.name for p in d.peers_changed] == ["bee"]
        assert not d.peers_added and not d.peers_removed
        assert {p.name for p in netmap.apply(seen, d).peers} == {"bee"}
    await a.aclose()
    await b.aclose()


async def test_removal_closes_the_stream_and_leaves_every_map_within_one_second(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    async with a.stream() as sa, b.stream() as sb:
        await sa.next_map(within=5)
        await sb.next_map(within=5)
        start = time.monotonic()
        assert (await live.admin.delete("/admin/nodes/a")).status_code == 204
        await wait_until(sb, lambda m: "a" not in names(m), 1.0)
        with pytest.raises(ControlError) as closed:
            while True:
                await sa.recv(within=1.0)
        assert closed.value.status == 4403
        assert time.monotonic() - start < 1.0
    with pytest.raises(ControlError) as refused:
        async with a.stream():
            pass
    assert refused.value.status in (401, 403)
    with pytest.raises(ControlError) as renew:
        await a.renew_cert()
    assert renew.value.status == 401
    await a.aclose()
    await b.aclose()


async def test_endpoints_and_signals_travel_between_nodes(live: Coord) -> None:
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    assert a.node_id is not None and b.node_id is not None
    async with a.stream() as sa, b.stream() as sb:
        await sa.next_map(within=5)
        await sb.next_map(within=5)
        await sa.send_endpoints(["6.0.0.2:41641", "10.0.0.2:41641"])
        m = await wait_until(sb, lambda m: m.peers and m.peers[0].endpoints, 1.0)
        assert m.peers[0].endpoints == ("6.0.0.2:41641", "10.0.0.2:41641") and m.peers[0].online
        await sa.send_signal(b.node_id, {"kind": "call-me-maybe", "candidates": ["6.0.0.2:41641"]})
        signal = await asyncio.wait_for(sb.signals.get(), 1.0) if not sb.signals.empty() else None
        while signal is None:
            msg = await sb.recv(within=1.0)
            if isinstance(msg, netmap.SignalMessage):
                signal = msg
        assert signal.peer == a.node_id and signal.payload["kind"] == "call-me-maybe"
        await sa.send_signal(999999, {"x": 1})
        while True:
            msg = await sa.recv(within=1.0)
            if isinstance(msg, netmap.ErrorMessage):
                assert "unknown peer" in msg.message
                break
    await a.aclose()
    await b.aclose()


async def test_long_poll_returns_the_delta_when_something_changes(coord: Coord) -> None:
    key = await coord.user_and_key(reusable=True)
    a, _ = await coord.enroll("a", key)
    full = await a.fetch_map()
    assert isinstance(full, netmap.MapMessage) and full.map.self_node.name == "a"
    waiter = asyncio.create_task(a.fetch_map(since=full.map.version, wait=10))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    start = time.monotonic()
    await coord.enroll("b", key)
    msg = await asyncio.wait_for(waiter, 2)
    assert time.monotonic() - start < 1.0
    assert isinstance(msg, netmap.DeltaMessage)
    assert [p.name for p in msg.delta.peers_added] == ["b"]
    await a.post_message(netmap.EndpointsMessage(("6.0.0.9:1",)))
    nodes = (await coord.admin.get("/admin/nodes")).json()
    assert next(n for n in nodes if n["name"] == "a")["endpoints"] == ["6.0.0.9:1"]

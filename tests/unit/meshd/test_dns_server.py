"""The resolver's asyncio shell (meshd/dns/server.py) on loopback, asked by dnspython's real client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from meshd.dns.server import Resolver, ResolverBindError
from meshd.dns.zone import build
from tests.eventually import eventually_async


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running(resolver: Resolver) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(resolver.serve())
    try:
        await eventually_async(lambda: resolver.address is not None or task.done(), within=5)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_answers_over_udp_and_tcp_and_sees_a_new_zone_at_once() -> None:
    port = free_port()
    r = Resolver("127.0.0.1", port, build("mesh", [("a", ["100.64.0.1/32"])]))
    async with running(r):
        assert r.address == f"127.0.0.1:{port}"
        q = dns.message.make_query("a.mesh", "A")
        udp = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=2)
        assert [rd.to_text() for rd in udp.answer[0]] == ["100.64.0.1"]
        tcp = await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=2)
        assert [rd.to_text() for rd in tcp.answer[0]] == ["100.64.0.1"]
        r.zone = build("mesh", [("a", ["100.64.0.9/32"])])  # what the map applier does on a change
        udp = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=2)
        assert [rd.to_text() for rd in udp.answer[0]] == ["100.64.0.9"]
        other = await dns.asyncquery.udp(dns.message.make_query("example.com", "A"), "127.0.0.1", port=port)
        assert other.rcode() == dns.rcode.REFUSED
    assert r.address is None


async def test_a_port_in_use_raises_a_one_line_error_for_the_supervisor_and_leaves_no_socket() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        r = Resolver("127.0.0.1", port, build("mesh", []))
        with pytest.raises(ResolverBindError):
            await r.serve()
        assert r.address is None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(ResolverBindError):
            await r.serve()

    def udp_port_free() -> bool:  # the UDP socket of the failed attempt is closed (on the next loop turn)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
            again.bind(("127.0.0.1", port))
        return True

    await eventually_async(udp_port_free, within=2, ignore=(OSError,))


async def test_tcp_connections_are_bounded_and_idle_ones_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshd.dns import server

    monkeypatch.setattr(server, "TCP_IDLE", 0.3)
    monkeypatch.setattr(server, "MAX_TCP", 2)
    port = free_port()
    r = Resolver("127.0.0.1", port, build("mesh", [("a", ["100.64.0.1/32"])]))
    async with running(r):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        third = idle[2][0]
        assert await asyncio.wait_for(third.read(), 2) == b""  # over the bound: closed at once
        await eventually_async(lambda: r._tcp_open == 2, within=2)
        for reader, _ in idle[:2]:
            assert await asyncio.wait_for(reader.read(), 2) == b""  # idle: closed after TCP_IDLE
        assert r._tcp_open == 0
        for _, w in idle:
            w.close()


async def test_dnspython_is_imported_in_a_thread_after_the_resolver_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from meshd.dns import server, zone

    threads: list[threading.Thread] = []
    monkeypatch.setattr(server, "WARM_AFTER", 0.0)
    monkeypatch.setattr(zone, "warmed", lambda: False)
    monkeypatch.setattr(zone, "warm", lambda: threads.append(threading.current_thread()))
    r = Resolver("127.0.0.1", free_port(), build("mesh", []))
    async with running(r):
        await eventually_async(lambda: threads, within=2)
    assert threads[0] is not threading.main_thread()  # off the event loop (issue 15)

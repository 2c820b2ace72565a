"""Write amplification (issue 13): what a hostile client can make the coordinator write and fan out stays
bounded. Anonymous registrations are rate-limited per source and purged when expired; a node holds at most
MAX_STREAMS_PER_NODE map streams; a flapping node's endpoints are coalesced before they are written and
pushed; a relay reconnect loop writes at most one session audit row per node and minute.

Each test prints its figures (run with -s to see them)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from sqlalchemy import func, select, update

from coordinator import enrollment, nodes
from coordinator.db.models import AuditRecord, PendingEnrollment
from coordinator.hub import MAX_STREAMS_PER_NODE
from coordinator.relay import service as relay_service
from meshd.control import ControlClient, ControlError, MapStream, NodeKeys, PendingApproval
from meshd.proto import netmap
from tests.coordinator.conftest import Coord, coord, core, db_url, live, pg_socket, settings  # noqa: F401 - fixtures
from tests.coordinator.test_relay import enroll, relayed  # noqa: F401  (the fixture)
from tests.coordinator.test_stream import enroll_live
from tests.eventually import eventually_async

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(60)]


async def _count(coord: Coord, stmt: object) -> int:  # noqa: F811
    async with coord.core.read() as s:
        return int((await s.execute(stmt)).scalar_one())  # type: ignore[call-overload]


async def _audit(coord: Coord, action: str) -> int:  # noqa: F811
    return await _count(
        coord, select(func.count()).select_from(AuditRecord).where(AuditRecord.action == action)
    )


class _DeltaCount:
    """Counts the deltas a peer's stream gets from now on (what it got before is drained first)."""

    def __init__(self, stream: MapStream) -> None:
        self.stream = stream
        self.n = 0
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, stream: MapStream) -> _DeltaCount:
        while True:
            try:
                await stream.recv(within=0.3)
            except TimeoutError:
                break
        counter = cls(stream)
        counter.task = asyncio.create_task(counter._count())
        return counter

    async def _count(self) -> None:
        while True:
            if isinstance(await self.stream.recv(), netmap.DeltaMessage):
                self.n += 1

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_anonymous_registration_flood_is_rate_limited_capped_and_purged(coord: Coord) -> None:  # noqa: F811
    pending_rows = select(func.count()).select_from(PendingEnrollment)
    hostname = "Evil_" * 51  # 255 attacker-chosen characters
    accepted = refused = 0
    start = time.monotonic()
    for _ in range(500):
        try:
            result = await coord.client().register(hostname)
        except ControlError as exc:
            assert exc.status == 429, exc
            refused += 1
        else:
            assert isinstance(result, PendingApproval)
            accepted += 1
    took = time.monotonic() - start
    pending = await _count(coord, pending_rows)
    audited = await _audit(coord, "enrollment.requested")
    async with coord.core.read() as s:
        details = (
            (await s.execute(select(AuditRecord.details).where(AuditRecord.action == "enrollment.requested")))
            .scalars()
            .all()
        )
    longest = max(len(d) for d in details)
    print(
        f"\n500 anonymous registrations from one source in {took:.1f} s: {accepted} accepted, {refused} "
        f"refused (429); pending rows {pending}, audit rows {audited}, longest audit details {longest} chars"
    )
    bound = enrollment.ANON_BURST + enrollment.ANON_RATE * took + 1  # the bucket refills during the flood
    assert accepted <= bound and pending <= bound
    assert audited == accepted
    assert all(hostname not in d and ("e" * 64) not in d for d in details)
    assert all(enrollment.audit_hostname(hostname) in d for d in details)
    assert len(enrollment.audit_hostname(hostname)) == enrollment.AUDIT_HOSTNAME_MAX

    # expired codes are purged by the next anonymous registration (a fresh source: its own bucket)
    async with coord.core.transaction() as tx:
        await tx.session.execute(update(PendingEnrollment).values(expires_at=time.time() - 1))
    enrollment._anon_buckets.pop(coord.core, None)
    assert isinstance(await coord.client().register("late"), PendingApproval)
    after = await _count(coord, pending_rows)
    print(f"after expiry and one more registration: {after} pending row(s)")
    assert after == 1


async def test_a_node_holds_at_most_a_few_map_streams(live: Coord) -> None:  # noqa: F811
    key = await live.user_and_key(reusable=True)
    a = await enroll_live(live, "a", key)
    assert a.node_id is not None
    async with contextlib.AsyncExitStack() as stack:

        async def open_one() -> str:
            try:
                s: MapStream = await stack.enter_async_context(a.stream())
                msg = await s.recv(within=10)
            except ControlError as exc:
                return f"closed {exc.status}"
            return "map" if isinstance(msg, netmap.MapMessage) else type(msg).__name__

        start = time.monotonic()
        outcomes = await asyncio.gather(*(open_one() for _ in range(50)))
        held = len(live.core.hub.subscribers.get(a.node_id, ()))
        took = time.monotonic() - start
        print(
            f"\n50 stream opens by one node in {took:.1f} s: {outcomes.count('map')} got a map, "
            f"{sum(o.startswith('closed') for o in outcomes)} refused ({sorted(set(outcomes))}); "
            f"streams held {held}"
        )
        assert outcomes.count("map") == MAX_STREAMS_PER_NODE
        assert held == MAX_STREAMS_PER_NODE
        assert outcomes.count("closed 1013") == 50 - MAX_STREAMS_PER_NODE
    await a.aclose()


async def test_flapping_endpoints_are_coalesced_before_write_and_fan_out(live: Coord) -> None:  # noqa: F811
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    async with a.stream() as sa, b.stream() as sb:
        await sa.next_map(within=5)
        await sb.next_map(within=5)
        await asyncio.sleep(2.5)  # the online flags' windows pass and their pushes are out
        deltas = await _DeltaCount.start(sb)
        version = live.core.state.version
        start = time.monotonic()
        for i in range(200):
            await sa.send_endpoints([f"6.0.0.{i % 2 + 1}:41641", f"10.0.{i}.2:41641"])
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.01 - time.monotonic()))
        flapped = time.monotonic() - start
        last = ("6.0.0.2:41641", "10.0.199.2:41641")
        peer_a = live.core.state.peers[a.node_id]  # type: ignore[index]
        await eventually_async(
            lambda: live.core.state.peers[peer_a.node_id].endpoints == last,
            within=3,
            what="the last value won",
        )
        await asyncio.sleep(1.0)  # the last push reaches b
        await deltas.stop()
        writes = live.core.state.version - version
        print(
            f"\n200 endpoint flaps in {flapped:.1f} s: {writes} map writes, {deltas.n} deltas to the one "
            f"peer (window {live.core.settings.endpoint_write_interval} s)"
        )
        # the burst at once, then one per interval, and the held last value
        assert writes <= nodes.WRITE_BURST + flapped / live.core.settings.endpoint_write_interval + 1
        assert deltas.n <= writes + 1
        assert sb.map is not None and sb.map.peers[0].endpoints == last
    await a.aclose()
    await b.aclose()


async def test_relay_reconnect_loop_writes_bounded_audit_rows(relayed: Coord) -> None:  # noqa: F811
    a = await enroll(relayed, "a")
    before = {k: await _audit(relayed, f"relay.session.{k}") for k in ("open", "close")}
    start = time.monotonic()
    for _ in range(100):
        link = await a.connect(relayed.url, home=False)
        link.close()
    took = time.monotonic() - start
    svc = relayed.relay  # type: ignore[attr-defined]

    async def settled() -> bool:
        await asyncio.sleep(0.5)
        held = sum(n for (node, _), (_, n) in svc._audited.items() if node == a.enrollment.node_id)
        rows = 0
        for k in ("open", "close"):
            rows += await _audit(relayed, f"relay.session.{k}") - before[k]
        return rows + held >= 200

    await eventually_async(settled, within=10, what="every session was audited or counted")
    rows = {k: await _audit(relayed, f"relay.session.{k}") - before[k] for k in ("open", "close")}
    print(
        f"\n100 relay reconnects in {took:.1f} s: audit rows {rows} "
        f"(at most one per kind and node per {relay_service.RELAY_AUDIT_INTERVAL:.0f} s)"
    )
    assert rows == {"open": 1, "close": 1}


async def test_a_flapping_relay_home_is_coalesced_before_write_and_fan_out(relayed: Coord) -> None:  # noqa: F811
    """A node whose home region flaps 1, 2, 1, 2, ... writes a bounded number of changes; the last wins."""
    a = await enroll(relayed, "a")
    node_id = a.enrollment.node_id
    svc = relayed.relay  # type: ignore[attr-defined]
    state = relayed.core.state
    before = state.version
    start = time.monotonic()
    flaps = 200
    for i in range(flaps):
        await svc.attach(node_id, 2 if i % 2 == 0 else 1)
    last = 2 if (flaps - 1) % 2 == 0 else 1
    await eventually_async(
        lambda: state.peers[node_id].relay_home == last, within=5, what="the last relay_home is published"
    )
    took = time.monotonic() - start
    writes = state.version - before
    print(f"\n{flaps} relay_home flaps in {took:.1f} s: {writes} changes written and fanned out")
    assert writes <= relay_service.HOME_BURST + took / relay_service.HOME_INTERVAL + 1


async def test_pending_enrollments_are_capped_in_total_across_sources(
    coord: Coord,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anonymous registrations from many sources (each within its own per-source bucket) park at most
    MAX_PENDING rows in total; past it every source gets 429 until codes are approved or expire."""
    cap = 20
    monkeypatch.setattr(enrollment, "MAX_PENDING", cap)
    sources = 3 * cap
    accepted = 0
    refusals: list[str] = []
    start = time.monotonic()
    for i in range(sources):
        # a client address of its own for each registration: the per-source bucket never refuses
        transport = httpx.ASGITransport(
            app=coord.transport.app, client=(f"10.9.{i // 250}.{i % 250 + 1}", 4000)
        )
        client = ControlClient(coord.url, NodeKeys.generate(), None, transport=transport)
        try:
            result = await client.register(f"anon{i}")
        except ControlError as exc:
            assert exc.status == 429, exc
            refusals.append(str(exc))
        else:
            assert isinstance(result, PendingApproval)
            accepted += 1
        finally:
            await client.aclose()
    took = time.monotonic() - start
    pending = await _count(coord, select(func.count()).select_from(PendingEnrollment))
    print(
        f"\n{sources} anonymous registrations from {sources} sources in {took:.1f} s (cap patched to {cap}): "
        f"{accepted} accepted, {len(refusals)} refused (429), pending rows {pending}"
    )
    assert accepted == cap and pending == cap
    assert len(refusals) == sources - cap
    assert all("wait for approval" in r for r in refusals), refusals[:1]


async def test_online_state_flapping_is_coalesced_before_write_and_fan_out(live: Coord) -> None:  # noqa: F811
    """A node opening and closing its map stream over and over flips its online flag each time; the flag
    is written and pushed to its peers in a burst of WRITE_BURST, then at most once per interval."""
    key = await live.user_and_key(reusable=True)
    a, b = await enroll_live(live, "a", key), await enroll_live(live, "b", key)
    assert a.node_id is not None
    async with b.stream() as sb:
        await sb.next_map(within=5)
        await asyncio.sleep(2.5)  # b's own online flag and its push are out
        deltas = await _DeltaCount.start(sb)
        version = live.core.state.version
        start = time.monotonic()
        flaps = 100
        for _ in range(flaps):
            async with a.stream() as sa:
                await sa.next_map(within=5)
        flapped = time.monotonic() - start
        await eventually_async(
            lambda: not live.core.state.peers[a.node_id].online,  # type: ignore[index]
            within=5,
            what="the last value (offline) won",
        )
        await asyncio.sleep(2.5)  # presence pushes wait up to 2 s (hub.delay_for): the last one reaches b
        await deltas.stop()
        writes = live.core.state.version - version
        interval = live.core.settings.endpoint_write_interval
        print(
            f"\n{flaps} stream open/close cycles in {flapped:.1f} s ({2 * flaps} online flips): {writes} map "
            f"writes, {deltas.n} deltas to the one peer (burst {nodes.WRITE_BURST:.0f}, window {interval} s)"
        )
        assert writes <= nodes.WRITE_BURST + flapped / interval + 2  # + the held last value
        assert deltas.n <= writes + 1
    await a.aclose()

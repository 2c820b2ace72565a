"""PortMapper in virtual time against a scripted gateway (the netns test uses real miniupnpd)."""

from __future__ import annotations

import struct

import pytest

from meshd.nat import portmap

GW = "192.168.1.1"
PUBLIC = "6.0.0.1"


class Gateway:
    """Answers NAT-PMP and/or PCP like a router would; ``epoch`` is seconds since its (re)start."""

    def __init__(self, *, pcp: bool = True, natpmp_on: bool = True, port: int = 50000) -> None:
        self.pcp, self.natpmp_on, self.port = pcp, natpmp_on, port
        self.started = 0.0
        self.maps: dict[int, int] = {}  # internal -> lifetime

    def epoch(self, now: float) -> int:
        return int(now - self.started)

    def answer(self, data: bytes, now: float) -> bytes | None:
        if data[0] == 2 and self.pcp and data[1] == 0:  # ANNOUNCE
            return bytes([2, 0x80, 0, 0]) + struct.pack("!II", 0, self.epoch(now)) + bytes(12)
        if data[0] == 2 and self.pcp:
            lifetime = struct.unpack_from("!I", data, 4)[0]
            internal = struct.unpack_from("!H", data, 40)[0]
            self._book(internal, lifetime)
            resp = bytearray(data)
            resp[1] |= 0x80
            resp[2] = resp[3] = 0
            struct.pack_into("!II", resp, 4, lifetime, self.epoch(now))
            resp[12:24] = bytes(12)
            struct.pack_into("!H", resp, 42, self.port if lifetime else 0)
            resp[44:60] = bytes(10) + b"\xff\xff" + bytes(map(int, PUBLIC.split(".")))
            return bytes(resp)
        if data[0] == 0 and self.natpmp_on:
            if data[1] == 0:
                return struct.pack("!BBHI4s", 0, 128, 0, self.epoch(now), bytes(map(int, PUBLIC.split("."))))
            _, op, _, internal, _, lifetime = struct.unpack("!BBHHHI", data)
            self._book(internal, lifetime)
            return struct.pack(
                "!BBHIHHI", 0, 128 + op, 0, self.epoch(now), internal, self.port if lifetime else 0, lifetime
            )
        return None

    def _book(self, internal: int, lifetime: int) -> None:
        if lifetime:
            self.maps[internal] = lifetime
        else:
            self.maps.pop(internal, None)


def run(pm: portmap.PortMapper, gw: Gateway | None, until: float, now: float = 0.0) -> tuple[float, list]:  # type: ignore[type-arg]
    events = []
    while now <= until:
        for data, dst in pm.datagrams_to_send(now):
            assert dst == (GW, 5351)
            reply = gw.answer(data, now) if gw else None
            if reply is not None:
                pm.receive(reply, (GW, 5351), now + 0.001)
        pm.handle_timer(now)
        while (ev := pm.next_event()) is not None:
            events.append(ev)
        t = pm.next_timer()
        if t is None:
            break
        now = max(t, now + 0.001)
    return now, events


def test_both_protocols_probed_at_once_without_mapping_anything() -> None:
    gw = Gateway()
    pm = portmap.PortMapper(GW, "192.168.1.2", 41641, lifetime=7200)
    pm.start(0.0)
    first = pm.datagrams_to_send(0.0)
    assert {d[0][0] for d in first} == {0, 2}, "both protocols asked at once"
    for data, _ in first:
        reply = gw.answer(data, 0.0)
        assert reply is not None
        pm.receive(reply, (GW, 5351), 0.01)
    assert gw.maps == {}, "probes create no mapping"
    _, events = run(pm, gw, until=1.0, now=0.02)
    assert [type(e) for e in events] == [portmap.MapGranted]
    assert events[0].external == (PUBLIC, 50000)
    assert gw.maps == {41641: 7200}, "exactly one protocol mapped the port"


def test_natpmp_only_router() -> None:
    pm = portmap.PortMapper(GW, "192.168.1.2", 41641)
    pm.start(0.0)
    _, events = run(pm, Gateway(pcp=False), until=1.0)
    assert [type(e) for e in events] == [portmap.MapGranted]
    assert events[0].protocol == "natpmp" and events[0].external == (PUBLIC, 50000)


def test_renews_at_half_life_and_deletes_on_close() -> None:
    gw = Gateway(natpmp_on=False)
    pm = portmap.PortMapper(GW, "192.168.1.2", 41641, lifetime=100)
    pm.start(0.0)
    now, events = run(pm, gw, until=260.0)
    grants = [e for e in events if isinstance(e, portmap.MapGranted)]
    assert len(grants) >= 5 and all(e.protocol == "pcp" for e in grants)
    assert grants[1].expires - grants[0].expires < 60, "renewed at about half the lifetime"
    assert gw.maps == {41641: 100}
    pm.close(now)
    run(pm, gw, until=now + 5, now=now)
    assert pm.closed and gw.maps == {}


def test_router_restart_is_detected_from_the_epoch_and_the_map_recreated() -> None:
    gw = Gateway(natpmp_on=False)
    pm = portmap.PortMapper(GW, "192.168.1.2", 41641, lifetime=100)
    pm.start(0.0)
    now, _ = run(pm, gw, until=40.0)
    gw.started, gw.maps = 45.0, {}  # the router reboots and forgets everything
    now, events = run(pm, gw, until=120.0, now=now)
    assert gw.maps == {41641: 100}, "mapping re-created after the restart"
    assert any(isinstance(e, portmap.MapGranted) for e in events)


def test_no_gateway_answer_gives_maplost_then_reprobes() -> None:
    pm = portmap.PortMapper(GW, "192.168.1.2", 41641)
    pm.start(0.0)
    _now, events = run(pm, None, until=10.0)
    assert isinstance(events[0], portmap.MapLost) and "no NAT-PMP or PCP answer" in events[0].reason
    t = pm.next_timer()
    assert t is not None and t > 200, "asks again later: routers gain port mapping when reconfigured"


def _probe_answered(pm: portmap.PortMapper, gw: Gateway) -> list[bytes]:
    """Answer the probes; return the map request that follows (not yet sent to the gateway)."""
    for data, _ in pm.datagrams_to_send(0.0):
        reply = gw.answer(data, 0.0)  # None: the protocol this gateway does not speak
        if reply is not None:
            pm.receive(reply, (GW, 5351), 0.01)
    return [d for d, _ in pm.datagrams_to_send(0.02)]


@pytest.mark.parametrize("pcp", [True, False])
def test_close_while_the_map_request_is_unanswered_still_deletes(pcp: bool) -> None:
    """Stopped between our map request and its answer: the router maps the port anyway, so the delete
    must follow the request (issue 11: a stop at that moment left the mapping behind)."""
    gw = Gateway(pcp=pcp, natpmp_on=not pcp)
    pm = portmap.PortMapper(GW, "192.168.1.2", 41641)
    pm.start(0.0)
    [request] = _probe_answered(pm, gw)
    late_grant = gw.answer(request, 0.03)  # the router granted it; the answer is still on its way
    assert late_grant is not None and gw.maps == {41641: 7200}
    pm.close(0.04)
    assert not pm.closed, "a delete is due"
    pm.receive(late_grant, (GW, 5351), 0.05)  # the grant crosses our delete: not the end of it
    assert not pm.closed and pm.next_event() is None
    run(pm, gw, until=5.0, now=0.06)
    assert pm.closed and gw.maps == {}


def test_a_lost_delete_is_retried() -> None:
    gw = Gateway(natpmp_on=False)
    pm = portmap.PortMapper(GW, "192.168.1.2", 41641)
    pm.start(0.0)
    now, _ = run(pm, gw, until=1.0)
    pm.close(now)
    assert len(pm.datagrams_to_send(now)) == 1  # this one is lost
    run(pm, gw, until=now + 5, now=now + 0.01)
    assert pm.closed and gw.maps == {}


def test_close_before_anything_was_requested_sends_nothing() -> None:
    pm = portmap.PortMapper(GW, "192.168.1.2", 41641)
    pm.start(0.0)
    pm.close(0.0)
    assert pm.closed and pm.datagrams_to_send(0.0) == []

"""The relay hub's data path (issue 14): the packets of one read leave in one write per destination, in
order, at most hub.BATCH at a time; a paused destination still queues (and drops) frame by frame."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from coordinator.relay import hub as relay_hub
from coordinator.relay.hub import ClientConn, RelayHub, RelayMetrics
from meshd.proto import relay


class Conn(ClientConn):
    """A client whose transport records each write (one entry per send the transport would make)."""

    transport_name = "test"

    def __init__(self, hub: RelayHub, key: bytes) -> None:
        super().__init__(hub, "test")
        self.key = key
        self.writes: list[bytes] = []
        hub.clients[key] = self
        hub.conns.add(self)

    def _write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def _write_parts(self, parts: list[bytes | memoryview]) -> None:
        self.writes.append(b"".join(parts))

    def _close_transport(self) -> None:
        pass


def keyed(n: int) -> bytes:
    return bytes([n]) * 32


@pytest.fixture
def hub() -> RelayHub:
    def refuse(ticket: bytes, now: float) -> object:
        raise AssertionError("no hello in these tests")

    return RelayHub("test", 1, refuse, RelayMetrics(CollectorRegistry()))  # type: ignore[arg-type]


def test_one_read_is_one_write_per_destination_in_order(hub: RelayHub) -> None:
    a, b, c = Conn(hub, keyed(1)), Conn(hub, keyed(2)), Conn(hub, keyed(3))
    to_b = [f"b{i}".encode() * 100 for i in range(5)]
    to_c = [b"c0", b"c1"]
    wire = [relay.send_packet(b.key, p) for p in to_b[:3]] + [relay.send_packet(c.key, to_c[0])]
    wire += [relay.send_packet(b.key, p) for p in to_b[3:]] + [relay.send_packet(c.key, to_c[1])]
    data = b"".join(wire)
    a.feed(data[:700])  # a frame cut in two by the reads
    a.feed(data[700:])
    got_b = b"".join(b.writes)
    assert got_b == b"".join(relay.recv_packet(a.key, p) for p in to_b)
    assert len(b.writes) == 2  # one per read that had packets for b, not one per packet
    assert c.writes == [relay.recv_packet(a.key, to_c[0]) + relay.recv_packet(a.key, to_c[1])]  # 2nd read
    assert a.rx_bytes == sum(map(len, to_b + to_c)) and b.tx_bytes == sum(map(len, to_b))


def test_a_batch_is_at_most_batch_frames(hub: RelayHub) -> None:
    a, b = Conn(hub, keyed(1)), Conn(hub, keyed(2))
    packets = [i.to_bytes(2, "big") for i in range(2 * relay_hub.BATCH + 3)]
    a.feed(b"".join(relay.send_packet(b.key, p) for p in packets))
    assert [w.count(a.key) for w in b.writes] == [relay_hub.BATCH, relay_hub.BATCH, 3]
    assert b"".join(b.writes) == b"".join(relay.recv_packet(a.key, p) for p in packets)


def test_a_paused_destination_queues_and_drops_frame_by_frame(
    hub: RelayHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_hub, "QUEUE_FRAMES", 4)
    a, b = Conn(hub, keyed(1)), Conn(hub, keyed(2))
    b.pause()
    a.feed(b"".join(relay.send_packet(b.key, bytes([i])) for i in range(10)))
    assert b.writes == [] and b.drops == 6
    assert list(b.queue) == [relay.recv_packet(a.key, bytes([i])) for i in range(6, 10)]
    b.resume()
    assert b.writes == [relay.recv_packet(a.key, bytes([i])) for i in range(6, 10)] and not b.queue


def test_a_packet_before_the_hello_closes_the_connection(hub: RelayHub) -> None:
    a, b = Conn(hub, keyed(1)), Conn(hub, keyed(2))
    a.key = None
    a.feed(relay.send_packet(b.key, b"early"))
    assert a.closed and b.writes == []
    assert a.writes[-1].startswith(bytes([relay.FrameType.CLOSE]))

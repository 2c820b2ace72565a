"""One relay link: pings (cancellation propagates, a closed link or silence is a RelayLinkError), connect
failures are RelayLinkErrors, and outbound packets are bounded on both transports."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nacl.signing import SigningKey

from meshd.proto import relay
from meshd.proto.relay import FrameType
from meshd.relay import link as rlink
from tests.eventually import eventually_async
from tests.unit.meshd.relay.fakerelay import FakeRelay

pytestmark = pytest.mark.timeout(30)

KEY = bytes(range(32))
HELLO = relay.ServerHello("fake", 1, 20.0)
SEED = bytes(32 * [5])
CHALLENGE = relay.Challenge(1, bytes(32))


def sign(message: bytes) -> bytes:
    return SigningKey(SEED).sign(message).signature


def me(challenged: bool = True) -> rlink._Hello:
    h = rlink._Hello(KEY, b"t", sign, 1, True)
    h.challenge = CHALLENGE if challenged else None
    return h


def connect(url: str, **kw: Any) -> Any:
    return rlink.connect(url, KEY, b"t", sign=sign, region_id=1, home=True, on_packet=lambda s, p: None, **kw)


class Wire(rlink._Base):
    """A link implementation without a network: records what the link writes."""

    def __init__(self) -> None:
        super().__init__(lambda src, packet: None, lambda key: None, me())
        self.written: list[bytes] = []

    def write(self, data: bytes, droppable: bool = False) -> None:
        self.written.append(data)

    def close(self, reason: str) -> None:
        self._lost(reason)

    def answer_pings(self) -> None:
        for data in self.written:
            [frame] = relay.FrameDecoder().feed(data)
            if frame.type == FrameType.PING:
                self._frames(relay.encode(FrameType.PONG, frame.payload))


def a_link() -> tuple[rlink.RelayLink, Wire]:
    wire = Wire()
    return rlink.RelayLink(wire, "test", HELLO), wire


async def test_cancelling_a_ping_propagates_cancelled_error() -> None:
    link, wire = a_link()
    task = asyncio.create_task(link.ping(within=30))
    await eventually_async(lambda: wire.pings, within=2, what="the PING is in flight")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wire.pings == {}  # nothing left behind


async def test_a_ping_on_a_link_that_closes_is_a_link_error_not_a_cancellation() -> None:
    link, wire = a_link()
    task = asyncio.create_task(link.ping(within=30))
    await eventually_async(lambda: wire.pings, within=2, what="the PING is in flight")
    link.close("test over")
    with pytest.raises(rlink.RelayLinkError, match="relay link closed: test over"):
        await task


async def test_an_unanswered_ping_is_a_link_error_and_leaves_nothing_behind() -> None:
    link, wire = a_link()
    with pytest.raises(rlink.RelayLinkError, match="did not answer a ping"):
        await link.ping(within=0.05)
    assert wire.pings == {}


async def test_an_answered_ping_measures_the_round_trip() -> None:
    link, wire = a_link()
    task = asyncio.create_task(link.ping(within=5))
    await eventually_async(lambda: wire.pings, within=2, what="the PING is in flight")
    wire.answer_pings()
    assert 0 <= await task < 5


@pytest.mark.parametrize("url", ["ftp://x", "http://127.0.0.1:99999", "http://", "not a url"])
async def test_a_bad_url_is_a_link_error(url: str) -> None:
    with pytest.raises(rlink.RelayLinkError, match="cannot connect to relay"):
        await connect(url)


async def test_connect_and_ping_the_scripted_relay(fake_relay: FakeRelay) -> None:
    link = await connect(fake_relay.url)
    try:
        assert (link.transport, link.info) == ("upgrade", HELLO)
        assert await link.ping() >= 0
    finally:
        link.close()
    await eventually_async(lambda: fake_relay.open == 0, within=2, what="the relay saw the close")
    # the hello waited for the challenge and is signed over it by the node key
    [hello] = fake_relay.hellos_seen
    assert relay.hello_signed_by(bytes(SigningKey(SEED).verify_key), fake_relay.challenges[0], hello)


async def test_a_relay_that_says_it_is_another_region_gets_no_hello(fake_relay: FakeRelay) -> None:
    """The hello is signed for the region we dial: a relay that names another one learns nothing."""
    fake_relay.region_id = 2
    with pytest.raises(rlink.RelayLinkError, match="relay says it is region 2, not 1"):
        await connect(fake_relay.url, transports=("upgrade",))
    assert fake_relay.hellos == 0


async def test_a_relay_that_does_not_answer_in_time_is_a_link_error(fake_relay: FakeRelay) -> None:
    fake_relay.hold_hello = asyncio.Event()
    with pytest.raises(rlink.RelayLinkError, match=r"no answer within 0\.2 s"):
        await connect(fake_relay.url, within=0.2, transports=("upgrade",))
    fake_relay.hold_hello.set()  # the relay answers too late: it finds the connection closed
    await eventually_async(lambda: fake_relay.open == 0, within=2, what="the half-open connection was closed")


class StuckTransport(asyncio.Transport):
    """A transport whose peer reads nothing: what is written stays in its buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.buffered: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buffered.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def test_upgrade_link_drops_packets_while_the_relay_does_not_keep_up() -> None:
    proto = rlink._UpgradeProtocol(lambda s, p: None, lambda k: None, me(), b"request")
    transport = StuckTransport()
    proto.connection_made(transport)
    assert transport.high == relay.WRITE_HIGH  # meshd's buffer towards a stalled relay, in bytes
    link = rlink.RelayLink(proto, "upgrade", HELLO)
    proto.pause_writing()  # asyncio: the transport buffer passed its high-water mark
    for _ in range(10):
        link.send_packet(KEY, b"packet")
    link.renew(KEY, b"ticket", home=True)  # control frames still go out
    assert link.dropped == 10
    signature = relay.sign_hello(SEED, CHALLENGE, KEY, True, b"ticket")
    assert transport.buffered == [b"request", relay.client_hello(KEY, b"ticket", signature, home=True)]
    proto.resume_writing()
    link.send_packet(KEY, b"packet")
    await asyncio.sleep(0)  # packets go out batched, once per loop iteration
    assert transport.buffered[-1] == relay.send_packet(KEY, b"packet")


async def test_upgrade_link_writes_the_packets_of_one_loop_iteration_at_once_in_order() -> None:
    proto = rlink._UpgradeProtocol(lambda s, p: None, lambda k: None, me(), b"request")
    transport = StuckTransport()
    proto.connection_made(transport)
    link = rlink.RelayLink(proto, "upgrade", HELLO)
    packets = [i.to_bytes(2, "big") * 600 for i in range(rlink.BATCH + 5)]
    for p in packets[:3]:
        link.send_packet(KEY, p)
    assert transport.buffered == [b"request"]  # nothing yet: the batch closes at the end of the iteration
    await asyncio.sleep(0)
    assert transport.buffered[1:] == [b"".join(relay.send_packet(KEY, p) for p in packets[:3])]
    for p in packets[3:]:  # more than BATCH in one iteration: a full batch goes at once, the rest after
        link.send_packet(KEY, p)
    link.renew(KEY, b"ticket", home=True)  # a control frame never overtakes the packets before it
    await asyncio.sleep(0)
    assert b"".join(transport.buffered[2:]) == b"".join(
        [*(relay.send_packet(KEY, p) for p in packets[3:]), transport.buffered[-1]]
    )
    assert len(transport.buffered) == 5 and transport.buffered[-1][0] == relay.FrameType.CLIENT_HELLO


class StuckWebSocket:
    """A websocket whose send never completes."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.blocked = asyncio.Event()

    async def send(self, data: bytes) -> None:
        self.sent.append(data)
        await self.blocked.wait()

    async def close(self) -> None:
        pass

    def __aiter__(self) -> StuckWebSocket:
        return self

    async def __anext__(self) -> bytes:
        await asyncio.Event().wait()
        raise StopAsyncIteration


async def test_websocket_link_holds_at_most_out_frames_packets() -> None:
    ws = StuckWebSocket()
    impl = rlink._WsLink(lambda s, p: None, lambda k: None, me(), ws)
    link = rlink.RelayLink(impl, "websocket", HELLO)
    for _ in range(rlink.OUT_FRAMES + 100):
        link.send_packet(KEY, b"p")
    link.renew(KEY, b"ticket", home=True)
    assert link.dropped == 100
    assert len(impl.out) == rlink.OUT_FRAMES + 1  # the ticket renewal was not dropped
    link.close()


async def test_websocket_link_holds_at_most_queue_bytes_and_never_an_oversized_packet() -> None:
    ws = StuckWebSocket()
    impl = rlink._WsLink(lambda s, p: None, lambda k: None, me(), ws)
    link = rlink.RelayLink(impl, "websocket", HELLO)
    link.send_packet(KEY, bytes(relay.MAX_PACKET + 1))  # the relay would close the link on it
    assert link.dropped == 1 and not impl.out
    frame = len(relay.send_packet(KEY, bytes(relay.MAX_PACKET)))
    for _ in range(rlink.OUT_FRAMES):
        link.send_packet(KEY, bytes(relay.MAX_PACKET))
    assert len(impl.out) == relay.QUEUE_BYTES // frame
    assert impl.queued == sum(map(len, impl.out)) <= relay.QUEUE_BYTES
    assert link.dropped == 1 + rlink.OUT_FRAMES - relay.QUEUE_BYTES // frame
    link.close()

"""Relay access is bound to the node key: what an on-path attacker or a standalone-relay operator captures
(a CLIENT_HELLO with its ticket and signature) opens no session anywhere, a ticket works only at the
region it names, and a rotated WireGuard key's tickets stop working at once.

Two in-process relay regions on loopback: the coordinator's embedded region 1 and a standalone region 2
linked over its feed (the fixtures of tests/coordinator/test_relay_standalone.py). Each attack has a
positive control: the same step by the real node works.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from coordinator.relay.standalone import Standalone
from meshd.control import NodeKeys
from meshd.proto import relay
from meshd.relay import link as rlink
from tests.coordinator.conftest import Coord, coord, core, settings  # noqa: F401 - fixtures
from tests.coordinator.test_relay import Node, enroll, relayed  # noqa: F401 - fixture
from tests.coordinator.test_relay_standalone import region2  # noqa: F401 - fixture

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(60)]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'coordinator.db'}"


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


class Tap:
    """An on-path attacker: a TCP forwarder in front of a relay that keeps what the client sends."""

    def __init__(self, target: str) -> None:
        self.target = host_port(target)
        self.client_bytes = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.target)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    if keep:
                        self.client_bytes += data
                    w.write(data)
            w.close()

        for t in (asyncio.create_task(pipe(cr, sw, True)), asyncio.create_task(pipe(sr, cw, False))):
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def captured_hello(self) -> bytes:
        """The CLIENT_HELLO frame as it crossed the wire (after the HTTP request head)."""
        data = bytes(self.client_bytes)
        frames = relay.FrameDecoder().feed(data[data.index(b"\r\n\r\n") + 4 :])
        hello = next(f for f in frames if f.type == relay.FrameType.CLIENT_HELLO)
        return relay.encode(hello.type, hello.payload)


@pytest.fixture
async def tap_region1(relayed: Coord) -> AsyncIterator[Tap]:  # noqa: F811
    tap = Tap(relayed.url)
    tap.server = await asyncio.start_server(tap.handle, "127.0.0.1", 0)
    try:
        yield tap
    finally:
        tap.server.close()
        for t in list(tap.tasks):
            t.cancel()


async def present(url: str, hello_frame: bytes | Callable[[relay.Challenge], bytes]) -> str:
    """Open a raw relay connection, read the relay's challenge, send `hello_frame` verbatim: what the
    relay answers (``SERVER_HELLO`` when it let us in, else its CLOSE reason)."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        writer.write(relay.upgrade_request("x"))
        await reader.readuntil(b"\r\n\r\n")
        decoder = relay.FrameDecoder()
        answered: list[relay.Frame] = []
        while not answered:
            answered += decoder.feed(await asyncio.wait_for(reader.read(65536), 3))
        challenge = relay.parse_challenge(answered.pop(0))
        writer.write(hello_frame(challenge) if callable(hello_frame) else hello_frame)
        while not answered:
            data = await asyncio.wait_for(reader.read(65536), 3)
            if not data:
                return "closed without a word"
            answered += decoder.feed(data)
        f = answered[0]
        ok = f.type == relay.FrameType.SERVER_HELLO
        return "SERVER_HELLO" if ok else f.payload.decode(errors="replace")
    finally:
        writer.close()


async def victim_stays_connected(
    c: Coord, victim: Node, link: rlink.RelayLink, inbox: asyncio.Queue[tuple[bytes, bytes]]
) -> None:
    """The victim's session is the one the relay routes to: a peer's packet still reaches it."""
    assert link.is_open, "the victim's relay link was closed"
    sender = await enroll(c, "sender")
    s = await sender.connect(c.url)
    try:
        s.send_packet(victim.key, b"still yours")
        assert await asyncio.wait_for(inbox.get(), 2) == (sender.key, b"still yours")
    finally:
        s.close()


async def test_a_captured_hello_replayed_at_the_same_or_another_region_is_refused_and_the_victim_stays(
    relayed: Coord,  # noqa: F811
    region2: Standalone,  # noqa: F811
    tap_region1: Tap,
) -> None:
    victim = await enroll(relayed, "victim")
    inbox: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    # the victim connects to region 1 through the attacker's tap (the relay's URL as the victim knows it)
    link = await victim.connect(tap_region1.url, on_packet=lambda s, p: inbox.put_nowait((s, p)))
    captured = tap_region1.captured_hello()

    # the attack: the captured hello (key, ticket, signature), byte for byte, at region 1 and region 2
    for url in (relayed.url, region2.url):
        answer = await present(url, captured)
        assert answer != "SERVER_HELLO", f"a replayed hello opened a session at {url}"
        assert "refused" in answer, answer
    # ...and the captured ticket with a fresh challenge signed by a key the attacker holds
    tk = relay.parse_hello(relay.FrameDecoder().feed(captured)[0]).ticket
    mallory = SigningKey.generate()

    def forged(ch: relay.Challenge) -> bytes:
        return relay.client_hello(victim.key, tk, relay.sign_hello(bytes(mallory), ch, victim.key, True, tk))

    answer = await present(relayed.url, forged)
    assert answer != "SERVER_HELLO" and "not signed by the ticket's node key" in answer, answer
    await victim_stays_connected(relayed, victim, link, inbox)

    # positive control: the victim itself, with its node key, gets in at region 2 (the relay works)
    own = await victim.connect(region2.url, region_id=2, home=False)
    assert own.is_open
    own.close()
    link.close()


async def test_a_ticket_for_region_2_is_refused_at_region_1(
    relayed: Coord,  # noqa: F811
    region2: Standalone,  # noqa: F811
) -> None:
    node = await enroll(relayed, "n")
    for_2 = await node.ticket(region_id=2)
    # even signed correctly by the node (so only the region is wrong), region 1 refuses it
    with pytest.raises(rlink.RelayLinkError, match="ticket is for relay region 2, not 1"):
        await node.connect(relayed.url, region_id=1, ticket=for_2)
    # positive control: at region 2 it works
    link = await node.connect(region2.url, region_id=2, ticket=for_2)
    assert link.is_open
    link.close()


@pytest.mark.parametrize("region", [1, 2])
async def test_after_a_wireguard_key_rotation_the_old_ticket_is_refused(
    relayed: Coord,  # noqa: F811
    region2: Standalone,  # noqa: F811
    region: int,
) -> None:
    node = await enroll(relayed, "n")
    url = relayed.url if region == 1 else region2.url
    old_ticket = await node.ticket(region)
    old_link = await node.connect(url, region_id=region, ticket=old_ticket)
    new_private = bytes(PrivateKey.generate())
    await node.client.rotate_key(new_private)  # the coordinator now knows the new key only
    # the session under the old key is dropped at once (a tick on region 1, the feed on region 2)
    reason = await asyncio.wait_for(asyncio.shield(old_link.closed), 2)
    assert "rotated" in reason, reason
    # the old, unexpired ticket (signed correctly with the node key) opens nothing any more
    with pytest.raises(rlink.RelayLinkError, match="rotated away"):
        await node.connect(url, region_id=region, ticket=old_ticket)
    # positive control: a ticket for the new key works
    node.client.keys = NodeKeys(new_private, node.client.keys.node_private)
    link = await node.connect(url, region_id=region)
    assert link.is_open
    link.close()

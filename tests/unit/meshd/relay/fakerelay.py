"""A scripted relay on loopback for the relay client's tests: speaks the Upgrade transport of
meshd.proto.relay (challenge first; it keeps the hellos but checks no ticket), counts connections, and can
hold its SERVER_HELLO back."""

from __future__ import annotations

import asyncio
import os

from meshd.proto import relay
from meshd.proto.relay import FrameType


class FakeRelay:
    def __init__(self) -> None:
        self.connections = 0  #: TCP connections accepted
        self.ended = 0  #: ...and seen closed
        self.hellos = 0
        self.region_id = 1  #: the region id its challenges name
        self.challenges: list[relay.Challenge] = []
        self.hellos_seen: list[relay.ClientHello] = []
        self.pings = 0
        self.hold_hello: asyncio.Event | None = None  #: set: SERVER_HELLO waits for it
        self.answer_pings = True
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    @property
    def open(self) -> int:
        return self.connections - self.ended

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if not relay.is_upgrade_request(head[:-4]):
                return
            writer.write(relay.SWITCHING_PROTOCOLS)
            challenge = relay.Challenge(self.region_id, os.urandom(32))
            self.challenges.append(challenge)
            writer.write(relay.challenge(challenge))
            decoder = relay.FrameDecoder()
            while data := await reader.read(65536):
                for f in decoder.feed(data):
                    if f.type == FrameType.CLIENT_HELLO:
                        self.hellos += 1
                        self.hellos_seen.append(relay.parse_hello(f))
                        if self.hold_hello is not None:
                            await self.hold_hello.wait()
                        writer.write(relay.server_hello(relay.ServerHello("fake", 1, 20.0)))
                    elif f.type == FrameType.PING:
                        self.pings += 1
                        if self.answer_pings:
                            writer.write(relay.encode(FrameType.PONG, f.payload))
        except (OSError, asyncio.IncompleteReadError, relay.RelayProtocolError):
            pass
        finally:
            self.ended += 1
            writer.close()

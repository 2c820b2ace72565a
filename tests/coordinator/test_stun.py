"""The coordinator's STUN server answers on two ports with the observed address (RFC 8489 §14.2)."""

from __future__ import annotations

import asyncio
import socket

from coordinator.stun import start_stun
from meshd.proto import stun


def _free_pair() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise AssertionError("no free port pair")


async def test_binding_answered_on_both_ports_with_the_other_address() -> None:
    port = _free_pair()
    transports = await start_stun("127.0.0.1", port)
    try:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        for p, other in ((port, port + 1), (port + 1, port)):
            txid = stun.new_transaction_id()
            await loop.sock_sendto(client, stun.binding_request(txid), ("127.0.0.1", p))
            data = await asyncio.wait_for(loop.sock_recv(client, 2048), 2)
            msg = stun.decode(data)
            assert msg.transaction_id == txid
            assert msg.xor_mapped_address == client.getsockname()
            assert msg.other_address == ("127.0.0.1", other)
        # garbage and WireGuard-looking datagrams get no answer
        await loop.sock_sendto(client, b"\x01\x00\x00\x00" + bytes(144), ("127.0.0.1", port))
        await loop.sock_sendto(client, stun.binding_request(stun.new_transaction_id()), ("127.0.0.1", port))
        data = await asyncio.wait_for(loop.sock_recv(client, 2048), 2)
        assert stun.decode(data).cls == stun.Class.SUCCESS  # the first reply is the one to the real request
        client.close()
    finally:
        for t in transports:
            t.close()

"""Peer relay messages on the map stream (issue 14): where each goes, and this node's serve fact.

Three kinds arrive as signals (:mod:`meshd.proto.peerrelay`):

* the coordinator's signed orders (from node 0): ``serve``/``stop`` go to this node's peer relay server
  (when it has one: ``--peer-relay-ports`` and a raw socket for STUN), ``use``/``drop`` to the relay
  client. Each is verified first (the signing key may have to be fetched: a task per message);
* a peer's ``peer_relay_state`` (both sides of a pair are bound) goes to the UDP relay ports;
* anything else is not ours (:meth:`PeerRelaySignals.handle` returns False: call-me-maybe).

The server's own state messages go out through :meth:`PeerRelaySignals.send_soon`. Sends and
verifications run as tasks, at most :data:`MAX_IN_FLIGHT` at once: the coordinator (or a peer, through
it) can send signals faster than they complete, and the set must not grow without bound. Past the bound
a message is dropped, with one log line until the set drains again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from meshd.proto import peerrelay
from meshd.relay.peerrelay import PeerRelayServer, public_address

if TYPE_CHECKING:
    from meshd.control import ControlClient
    from meshd.nat.strategy import NatInfo
    from meshd.relay.manager import RelayManager

log = logging.getLogger("meshd.peerrelay")

MAX_IN_FLIGHT = 64  #: signal sends and verifications running at once; more are dropped
SendSignal = Callable[[int, dict[str, Any]], Awaitable[None]]


class PeerRelaySignals:
    """Routes peer relay signals (module docstring); owns this node's peer relay server, if any."""

    def __init__(
        self,
        client: ControlClient,
        relay: RelayManager,
        send_signal: SendSignal,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.relay = relay
        self.send_signal = send_signal
        self.clock = clock
        self.server: PeerRelayServer | None = None  #: serves when the coordinator says so
        self.dropped = 0  #: messages dropped past MAX_IN_FLIGHT
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropping = False
        self._closed = False

    def serve(self, ports: range, mesh_if: str) -> PeerRelayServer:
        """Make this node able to serve as a peer relay on ``ports`` (it binds and forwards as root)."""
        self.server = PeerRelayServer(ports, self.send_soon, mesh_if=mesh_if)
        return self.server

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def send_soon(self, node_id: int, payload: dict[str, Any]) -> None:
        """Send a signal from sync code (the peer relay server's state messages)."""
        self._spawn(lambda: self._send(node_id, payload))

    def handle(self, node: int, payload: dict[str, Any]) -> bool:
        """A signal from ``node`` (0: the coordinator): True when it was a peer relay message (used or
        refused here), False when it is someone else's (call-me-maybe)."""
        kind = payload.get("type")
        if kind == peerrelay.TYPE:
            if node == 0:  # from the coordinator itself; verified before use
                self._spawn(lambda: self._from_coordinator(payload))
            return True
        if kind == peerrelay.STATE_TYPE:
            if self._closed:
                return True
            try:
                peer, flags = peerrelay.decode_state(payload)
            except peerrelay.PeerRelayError as e:
                log.warning("peer relay state from node %d ignored: %s", node, e)
                return True
            self.relay.udp.peer_state(node, peer, flags)
            return True
        return False

    def facts(self, nat: NatInfo | None, local_addresses: Iterable[str]) -> tuple[str, int, int] | None:
        """(public address, low, high) when this node can be a peer relay (reported to the coordinator)."""
        if self.server is None or nat is None:
            return None
        addr = public_address(nat.reflexive.values(), set(local_addresses))
        ports = self.server.ports
        return (addr, ports.start, ports.stop - 1) if addr is not None else None

    def close(self) -> None:
        """Stop the server (its sockets, nft table and conntrack entries) and what is in flight."""
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        if self.server is not None:
            self.server.close("meshd stopping")

    async def _send(self, node_id: int, payload: dict[str, Any]) -> None:
        try:
            await self.send_signal(node_id, payload)
        except Exception as e:  # the stream is down: the server sends its state again on the next change
            log.info("peer relay state to node %d not sent: %s", node_id, e)

    async def _from_coordinator(self, payload: dict[str, Any]) -> None:
        client = self.client
        if client.node_id is None or client.map_keys is None:
            return
        try:
            keys = await client.map_keys(peerrelay.signer(payload))
            body = peerrelay.decode(payload, client.node_id, keys, self.clock())
        except Exception as e:  # a bad or forged offer costs nothing but this line
            log.warning("peer relay message refused: %s", e)
            return
        if self._closed:
            return
        if isinstance(body, peerrelay.Serve | peerrelay.Stop):
            if self.server is not None:
                self.server.handle(body)
            else:
                log.info("the coordinator asks this node to be a peer relay, but it cannot serve")
        else:
            self.relay.peer_relay(body)

    def _spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if self._closed:
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning("peer relay signals: %d in flight; dropping more until they drain", MAX_IN_FLIGHT)
            return
        task = asyncio.get_running_loop().create_task(work())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._dropping = False

"""The serving side of a peer relay (issue 14): meshd forwards other nodes' WireGuard packets.

When an admin turned this node into a peer relay (``coordinator nodes relay NAME on``) and it told the
coordinator it can serve (:func:`public_address`: a STUN-mapped address that is one of its own, so
nothing filters the relay ports in front of it), the coordinator sends it signed ``serve``/``stop``
signals (:mod:`meshd.proto.peerrelay`). Each ``serve`` is an allocation of the same core the region
relays use (:class:`meshd.proto.relayport.Allocations`, :meth:`~meshd.proto.relayport.Allocations.assign`)
served by the same shell (:class:`meshd.relay.portserver.PortServer`) with the same kernel fast path
(:mod:`meshd.relay.udpkernel`, table ``ip meshpeerrelay``: meshd runs as root). Nodes bind with the
secret the coordinator gave them; when both sides are bound each is told so with a
``peer_relay_state`` signal through the coordinator. Allocations are capped (64 per node, the range in
all), end after 60 s without a bind or packet, and :meth:`PeerRelayServer.close` removes every socket,
rule and conntrack entry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from meshd.proto import peerrelay
from meshd.proto.endpoint import Endpoint
from meshd.proto.relayport import Allocation, Allocations, PortFlags, Refused
from meshd.relay.portserver import PortServer
from meshd.relay.udpkernel import kernel_forwarder

log = logging.getLogger("meshd.peerrelay")

TABLE = "meshpeerrelay"
TICK = 1.0


def public_address(reflexive: Iterable[Endpoint], local: Iterable[str]) -> str | None:
    """Our public IPv4 address: a STUN-mapped address that is also on one of our interfaces (no NAT in
    front of us), else None. (A port map maps only WireGuard's port, not a relay range: not enough.)"""
    mine = set(local)
    for ip, _port in reflexive:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if addr.version == 4 and addr.is_global is not False and ip in mine:
            return ip
    return None


class PeerRelayServer(PortServer):
    """This node's peer relay ports (module docstring). ``send_signal(node id, payload)`` is sync: the
    daemon schedules the send on the map stream."""

    def __init__(
        self,
        ports: range,
        send_signal: Callable[[int, dict[str, Any]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        kernel: bool = True,
        host: str = "0.0.0.0",
        mesh_if: str | None = None,
    ) -> None:
        super().__init__(host, Allocations(ports), clock=clock)
        self.ports = ports
        self.send_signal = send_signal
        self._want_kernel = kernel
        self._kernel_tried = False
        self.mesh_if = mesh_if

    def handle(self, body: peerrelay.Serve | peerrelay.Stop) -> None:
        """A verified ``serve`` or ``stop`` from the coordinator."""
        if self.closed:
            return
        if isinstance(body, peerrelay.Stop):
            self.core.unassign(body.a, body.b, "withdrawn by the coordinator")
        else:
            self._kernel()
            try:
                self.core.assign(body.a, body.b, self.clock())
            except Refused as exc:
                log.warning("peer relay for nodes %d and %d refused: %s", body.a.node_id, body.b.node_id, exc)
        self._run()

    async def run(self) -> None:
        """Expire idle pairs, read kernel counters (run it supervised)."""
        while True:
            await asyncio.sleep(TICK)
            self.tick()

    def _kernel(self) -> None:
        """The fast path, looked for at the first pair (it deletes what an earlier run left)."""
        if self._kernel_tried or not self._want_kernel:
            return
        self._kernel_tried = True
        self.kernel = kernel_forwarder(0, TABLE, self.mesh_if)
        log.info("peer relay on ports %d-%d (%s forwarding)", self.ports.start, self.ports.stop - 1,
                 "kernel" if self.kernel is not None else "userspace")  # fmt: skip

    # -- hooks ----------------------------------------------------------------------------------------
    def _send_state(self, to: bytes, peer: bytes, flags: PortFlags, node: int) -> None:
        self.send_signal(node, peerrelay.state_payload(peer, flags))

    def _on_ended(self, alloc: Allocation, reason: str, opened: float) -> None:
        log.info(
            "peer relay for nodes %d and %d ended (%s) after %.0f s: %d/%d bytes",
            alloc.a.node_id,
            alloc.b.node_id,
            reason,
            time.time() - opened,
            alloc.a.bytes,
            alloc.b.bytes,
        )

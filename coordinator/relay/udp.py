"""UDP relay ports of a region relay: :class:`meshd.relay.portserver.PortServer` (the asyncio shell
around :class:`meshd.proto.relayport.Allocations`, shared with peer relays) wired to the relay hub.

Nodes ask for ports over their relay session (PORT_REQUEST), get their grants and states as relay
frames, and every ended allocation writes one session record per side (audit, byte counts). With a
kernel forwarder (:mod:`meshd.relay.udpkernel`, when the relay has CAP_NET_ADMIN) bound pairs are
forwarded by nftables.

Allocations live in memory only: they are short-lived and every node asks again after a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshd.proto import relay, relayfeed, relayport
from meshd.proto.relayfeed import SessionRecord
from meshd.proto.relayport import Allocation, Allocations, Grant, PortFlags, Refused
from meshd.relay.portserver import KernelForwarder, PortServer, parse_range
from meshd.relay.udpkernel import kernel_forwarder

if TYPE_CHECKING:
    from coordinator.mapstate import MapState
    from coordinator.relay.hub import ClientConn, RelayHub

log = logging.getLogger("coordinator.relay")

__all__ = ["KernelForwarder", "UdpPorts", "kernel_forwarder", "parse_range", "policy_check", "start"]


class UdpPorts(PortServer):
    """The UDP relay ports of one region's hub."""

    def __init__(
        self,
        hub: RelayHub,
        host: str,
        ports: range,
        *,
        may_talk: Callable[[int, int], bool] = lambda a, b: True,
        kernel: KernelForwarder | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(host, Allocations(ports, may_talk=may_talk), kernel=kernel, clock=clock)
        self.hub = hub
        self._counted: dict[int, int] = {}  #: port -> bytes already added to the metrics

    # -- from the hub -------------------------------------------------------------------------------------
    def request(self, conn: ClientConn, peer: bytes) -> None:
        assert conn.key is not None
        try:
            self.core.request(conn.key, conn.node_id, peer, self.clock())
        except Refused as exc:
            log.info("relay ports for node %d refused: %s", conn.node_id, exc)
            conn.send(
                relay.encode(
                    relay.FrameType.PORT_STATE, relayport.encode_state(peer, relayport.PortFlags.CLOSED)
                )
            )
        self._run()

    def node_left(self, key: bytes, reason: str) -> None:
        self.core.node_left(key, reason)
        self._run()

    def tick(self) -> None:
        """Periodic (the hub's tick): sample kernel counters, expire idle allocations, metrics."""
        super().tick()
        total = 0
        for port, proto in self.protos.items():
            last = self._counted.get(port, 0)
            total += proto.side.bytes - last
            self._counted[port] = proto.side.bytes
        if total:
            self.hub.metrics.udp_bytes.labels(self.hub.region).inc(total)
        self.hub.metrics.udp_allocations.labels(self.hub.region).set(len(self.core.by_pair))

    # -- hooks --------------------------------------------------------------------------------------------
    def _send_grant(self, to: bytes, grant: Grant) -> None:
        self._send(to, relay.FrameType.PORT_GRANT, relayport.encode_grant(grant))

    def _send_state(self, to: bytes, peer: bytes, flags: PortFlags, node: int) -> None:
        self._send(to, relay.FrameType.PORT_STATE, relayport.encode_state(peer, flags))

    def _send(self, to: bytes, ftype: relay.FrameType, payload: bytes) -> None:
        conn = self.hub.clients.get(to)
        if conn is not None:
            conn.send(relay.encode(ftype, payload))

    def _on_ended(self, alloc: Allocation, reason: str, opened: float) -> None:
        for s in alloc.sides():
            self._counted.pop(s.port, None)
        if self.hub.on_session is None:
            return
        now = time.time()
        for s in alloc.sides():
            self.hub.on_session(
                SessionRecord(
                    node_id=s.node_id,
                    key=s.key,
                    region=self.hub.region,
                    transport="udp",
                    opened=opened,
                    duration=round(now - opened, 3),
                    rx_bytes=s.bytes,
                    tx_bytes=s.other.bytes,
                    drops=0,
                    reason=reason[: relayfeed.MAX_TEXT],
                )
            )


def policy_check(state: MapState) -> Callable[[int, int], bool]:
    """The embedded relay's policy check for a port pair: both nodes exist and ``a`` may see ``b``
    (the coordinator's own view, on top of the mutual request every relay requires)."""

    def may_talk(a: int, b: int) -> bool:
        if a not in state.peers or b not in state.peers:
            return False
        seen = state.compiled.visible(a)
        return seen is None or b in seen

    return may_talk


def start(
    hub: RelayHub,
    host: str,
    ports: range,
    *,
    may_talk: Callable[[int, int], bool] = lambda a, b: True,
    kernel: KernelForwarder | None = None,
) -> UdpPorts:
    """Serve UDP relay ports on ``hub`` (with ``kernel``: the kernel fast path)."""
    udp = UdpPorts(hub, host, ports, may_talk=may_talk, kernel=kernel)
    hub.ports = udp
    log.info(
        "UDP relay ports %d-%d on %s (%s forwarding)",
        ports.start,
        ports.stop - 1,
        udp.host,
        "kernel" if kernel is not None else "userspace",
    )
    return udp

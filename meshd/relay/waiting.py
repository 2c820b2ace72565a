"""Handshake messages the relay delivered from a peer this host's WireGuard does not have yet (sans-IO).

Two daemons that start together do not learn of each other at the same moment: the coordinator sends
each one a map (or a delta) naming the other, and applying it (WireGuard's reconcile) takes tens of
milliseconds. The side with the lower WireGuard key initiates the moment its WireGuard adds the peer
(meshd.nat.endpoints), so its initiation can reach the other side through the relay before that side's
map or WireGuard has the sender: WireGuard drops a message from a key it does not know, and the first
handshake would wait for the sender's restart (a second or more) or WireGuard's retry (5 s). The relay
itself holds packets for a node that is not connected yet (coordinator/relay/hub.py); this is the same
for a node that is connected but not ready: small packets wait here, a few per peer for ``HOLD_SECONDS``,
and go to WireGuard the moment it has the peer (:meth:`meshd.relay.manager.RelayManager.configured`).
"""

from __future__ import annotations

from collections import deque

HOLD_SECONDS = 3.0  #: as long as the relay holds packets for a node that is not connected yet
HOLD_PER_PEER = 4  #: a first initiation and WireGuard's or meshd's next tries
HOLD_TOTAL = 256  #: in all, across senders (bounded whatever the relay delivers)
HOLD_MAX_BYTES = 256  #: handshake messages are 148, 92 and 64 bytes; data is not held


class Waiting:
    """Packets by sender, waiting for WireGuard to have that sender."""

    def __init__(self) -> None:
        self._held: dict[bytes, deque[tuple[float, bytes]]] = {}
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def hold(self, src: bytes, packet: bytes | memoryview, now: float) -> bool:
        """Keep a small packet from ``src`` (copied: ``packet`` may be a view into a read buffer); False
        when it is too big or the table is full (the packet is dropped, as it was before)."""
        if len(packet) > HOLD_MAX_BYTES:
            return False
        queue = self._held.get(src)
        if queue is None:
            if self._total >= HOLD_TOTAL and not self._expire(now):
                return False
            queue = self._held[src] = deque()
        elif len(queue) >= HOLD_PER_PEER:
            queue.popleft()  # the newest tries matter most
            self._total -= 1
        queue.append((now, bytes(packet)))
        self._total += 1
        return True

    def take(self, src: bytes, now: float) -> list[bytes]:
        """What ``src`` sent in the last ``HOLD_SECONDS``, oldest first (and forget it)."""
        queue = self._held.pop(src, None)
        if not queue:
            return []
        self._total -= len(queue)
        return [packet for at, packet in queue if now - at <= HOLD_SECONDS]

    def _expire(self, now: float) -> bool:
        """Forget the senders whose newest packet is too old; True if any room was made."""
        old = [src for src, queue in self._held.items() if now - queue[-1][0] > HOLD_SECONDS]
        for src in old:
            self._total -= len(self._held.pop(src))
        return bool(old)

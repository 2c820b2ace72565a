"""Probes between node keys (sans-IO): seal pings, answer them, match answers to the ping they answer.

A probe is a :mod:`meshd.proto.disco` ping sealed to the peer's node key and sent from the WireGuard
port; the peer answers with a pong to the address the ping came from. :class:`Probes` remembers the
transaction id of every ping for ``TXID_TTL`` seconds, long enough for any answer still worth taking
(``PathConfig.late_after`` is 2 s), and never more than ``MAX_PENDING`` of them, so a flood of
candidates or peers cannot grow the table without bound (the oldest go first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshd.proto import disco
from meshd.proto.endpoint import Endpoint

TXID_TTL = 5.0
MAX_PENDING = 16384  #: 32 candidates x 2 probes a second x TXID_TTL, for 100 peers at once


@dataclass(frozen=True, slots=True)
class Pinged:
    """The peer probed us from ``src``; send ``reply`` back to ``src``."""

    peer: str
    src: Endpoint
    reply: bytes


@dataclass(frozen=True, slots=True)
class Answered:
    """Our probe to ``sent_to`` was answered from ``src`` after ``rtt`` seconds."""

    peer: str
    sent_to: Endpoint
    src: Endpoint
    rtt: float


@dataclass(frozen=True, slots=True)
class _Sent:
    peer: str
    to: Endpoint
    at: float


class Probes:
    """Probe sealing and matching for every peer of one node."""

    def __init__(self, node_seed: bytes, *, ttl: float = TXID_TTL, max_pending: int = MAX_PENDING) -> None:
        self.keys = disco.DiscoKeys(node_seed)
        self.ttl = ttl
        self.max_pending = max_pending
        self._sent: dict[bytes, _Sent] = {}  # txid -> ping, oldest first

    @property
    def pending(self) -> int:
        return len(self._sent)

    def ping(self, peer: str, node_key: bytes, to: Endpoint, now: float) -> bytes:
        """A sealed ping for ``peer`` (WireGuard key) to send to ``to`` (raises ``disco.DiscoError``)."""
        txid = disco.new_txid()
        data = self.keys.seal(node_key, disco.Ping(txid))
        self._sent[txid] = _Sent(peer, to, now)
        while len(self._sent) > self.max_pending:
            del self._sent[next(iter(self._sent))]
        return data

    def receive(
        self, data: bytes, src: Endpoint, peers: Mapping[bytes, str], now: float
    ) -> Pinged | Answered | None:
        """A probe arrived from ``src``; ``peers`` maps node keys to WireGuard keys.

        None for anything not from a peer, not opening, or answering no ping of ours (raises
        ``disco.DiscoError`` with the reason when the probe is malformed or does not open).
        """
        sender = disco.sender_key(data)
        peer = peers.get(sender)
        if peer is None:
            return None
        msg = self.keys.open(data, sender)
        if isinstance(msg, disco.Ping):
            return Pinged(peer, src, self.keys.seal(sender, disco.Pong(msg.txid, src)))
        sent = self._sent.pop(msg.txid, None)
        if sent is None or sent.peer != peer:
            return None
        return Answered(peer, sent.to, src, now - sent.at)

    def expire(self, now: float) -> None:
        """Forget pings older than ``ttl`` (call it from the timer loop)."""
        self._sent = {k: v for k, v in self._sent.items() if now - v.at < self.ttl}

    def forget(self, node_key: bytes) -> None:
        """A peer left: drop its cached key box."""
        self.keys.forget(node_key)

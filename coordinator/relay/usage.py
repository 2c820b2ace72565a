"""What a standalone relay region's feed tells the coordinator about its traffic (issue 18, dashboard).

A standalone relay keeps its live counters to itself (its own ``/metrics``); over the feed it reports
each session's opening and, when a session ends, its byte counts (:class:`meshd.proto.relayfeed
.SessionRecord`, TCP/WebSocket sessions and each side of a UDP relay-port pair alike). These tallies sum
those reports per region and transport, in memory, since this coordinator process started: they are
what the coordinator knows, not live counters (a long session counts when it ends).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshd.proto.relayfeed import SessionOpen, SessionRecord

#: at most this many regions are tallied (region names come from relays holding the relay secret)
MAX_REGIONS = 256


@dataclass
class Tally:
    opened: int = 0  #: sessions reported opened (TCP/WebSocket; UDP port pairs report no opening)
    closed: int = 0  #: sessions (or UDP sides) reported ended
    bytes: int = 0  #: packet bytes the ended sessions' clients sent into the relay


@dataclass
class FeedUsage:
    """Region name -> transport kind (``tcp`` or ``udp``) -> tally."""

    regions: dict[str, dict[str, Tally]] = field(default_factory=dict)

    def _tally(self, region: str, transport: str) -> Tally | None:
        kinds = self.regions.get(region)
        if kinds is None:
            if len(self.regions) >= MAX_REGIONS:
                return None
            kinds = self.regions[region] = {}
        kind = "udp" if transport == "udp" else "tcp"  # upgrade and websocket are both TCP
        return kinds.setdefault(kind, Tally())

    def note(self, msg: SessionOpen | SessionRecord) -> None:
        tally = self._tally(msg.region, msg.transport)
        if tally is None:
            return
        if isinstance(msg, SessionOpen):
            tally.opened += 1
        else:
            tally.closed += 1
            tally.bytes += max(0, msg.rx_bytes)

    def of(self, region: str, kind: str) -> Tally | None:
        return self.regions.get(region, {}).get(kind)

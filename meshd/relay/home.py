"""The relay client's decisions, pure (no I/O, no clock of their own): which region is home, which
regions need a link, where a packet for a peer goes, when to give up on the home region.

:class:`meshd.relay.manager.RelayManager` does the I/O and asks these.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

DECIDE_AFTER = 2.0  #: choosing home: after this many seconds, the fastest region measured so far wins...
GIVE_UP_AFTER = 5.0  #: ...and after this many with none measured, the lowest region id
HOME_FAILOVER = 3.0  #: seconds the home region may be unreachable before another is chosen


def pick_home(rtts: Mapping[int, float], regions: Collection[int], elapsed: float) -> int | None:
    """The home region once it can be decided, else None (measure again).

    ``rtts``: round-trip times measured so far by region id; ``elapsed``: seconds since choosing began.
    Every region measured, or ``DECIDE_AFTER`` passed with some: the fastest (lowest id on a tie).
    ``GIVE_UP_AFTER`` passed with none: the lowest id, so a node is never without a home while any
    region exists (its link keeps retrying; the relay may come back).
    """
    measured = {rid: rtt for rid, rtt in rtts.items() if rid in regions}
    if measured and (len(measured) == len(regions) or elapsed >= DECIDE_AFTER):
        return min(measured, key=lambda rid: (measured[rid], rid))
    if elapsed >= GIVE_UP_AFTER and regions:
        return min(regions)
    return None


def wanted(home: int | None, regions: Collection[int], peer_homes: Iterable[int | None]) -> set[int]:
    """Regions that need a link: home, every peer's home region we know, and all while home is unknown
    (they are being measured)."""
    want = set(regions) if home is None else {home}
    want |= {h for h in peer_homes if h is not None and h in regions}
    return want


def route(
    peer_home: int | None, home: int | None, regions: Collection[int], is_open: Callable[[int], bool]
) -> int | None:
    """The region to send a peer's packet through: the peer's home region when its link is open (or it is
    our home too: the packet waits for the link), else our own home (the peer may be connected there
    as well; if not, the relay says PEER_GONE), else None (drop)."""
    if peer_home is not None and peer_home in regions and (peer_home == home or is_open(peer_home)):
        return peer_home
    return home if home is not None and home in regions else None


def fail_over_due(down_since: float | None, now: float, n_regions: int) -> bool:
    """Whether the home region has been unreachable long enough, and there is another to choose."""
    return down_since is not None and now - down_since >= HOME_FAILOVER and n_regions >= 2

"""Tell the coordinator how this node reaches each peer, for the admin dashboard (issue 18).

The summary is small on purpose: per peer node id its path (``direct``, ``relay`` or ``none``), the
relay transport when relayed and the probe round trip; no endpoints, no byte counts. It is sent as a
signed ``PUT /api/v1/paths`` only when it changed, and at most once per :data:`MIN_INTERVAL` seconds
(a path that flaps between relay and direct costs the coordinator one request per 5 s, not one per
flap). A latency change counts only when it leaves its half-octave bucket, so jitter sends nothing.
The report also carries this node's own netcheck :class:`Facts` (UDP reachable, NAT mapping, active port
map) so the coordinator can say why a pair is relayed (meshd/why.py); a change of facts is a change too.

:class:`Debouncer` is the sans-IO core; :func:`report_loop` the thin shell the daemon supervises.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshd.control import ControlClient, ControlError
from meshd.localcmd import LocalCommands
from meshd.status import PeerStatus

if TYPE_CHECKING:
    from meshd.daemon import Daemon
    from meshd.nat.strategy import NatInfo

log = logging.getLogger("meshd.pathreport")

PATH = "/api/v1/paths"
MIN_INTERVAL = 5.0  #: seconds between two reports (and between retries after a failure)
POLL = 1.0  #: seconds between looks at the local status
#: seconds after start before the first look: a report at start says nothing (no peer has a path yet)
#: and its status snapshot and signed request would compete with the map stream's handshake for the CPU
#: and the coordinator, in the second that decides the time to the first ping (issue 15)
FIRST_LOOK = 2.0
#: the coordinator keeps no more than this per node either; 512 worst-case entries (~40 KB) stay well
#: under the coordinator's 64 KiB body limit
MAX_PEERS = 512


@dataclass(frozen=True, slots=True)
class PathEntry:
    node: int  #: the peer's node id
    path: str  #: "direct" | "relay" | "none"
    relay_transport: str | None = None  #: "udp" | "tcp" | "peer" when relayed
    latency_ms: float | None = None

    def key(self) -> tuple[int, str, str | None, int | None]:
        """What counts as a change: the path, the transport, the latency's half-octave bucket."""
        bucket = None if self.latency_ms is None else round(2 * math.log2(1 + self.latency_ms))
        return (self.node, self.path, self.relay_transport, bucket)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "path": self.path,
            "relay_transport": self.relay_transport,
            "latency_ms": self.latency_ms,
        }


Summary = tuple[PathEntry, ...]


@dataclass(frozen=True, slots=True)
class Facts:
    """What this node's netcheck knows of its own network (the ``facts`` object of a report)."""

    udp: bool | None  #: STUN over UDP answered (None: not known yet)
    #: "EIM" | "EDM" (None: fewer than two STUN answers) | "none": a public address (no NAT)
    mapping: str | None
    portmap: str | None = None  #: "upnp" | "natpmp" | "pcp" while a port map is active
    #: round trip to the home region relay, ms, in half-octave steps (peer relays, issue 14)
    relay_ms: float | None = None
    serve: tuple[str, int, int] | None = None  #: can be a peer relay: (public address, low, high port)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"udp": self.udp, "mapping": self.mapping, "portmap": self.portmap}
        if self.relay_ms is not None:
            out["relay_ms"] = self.relay_ms
        if self.serve is not None:
            out["serve"] = {"addr": self.serve[0], "low": self.serve[1], "high": self.serve[2]}
        return out


def coarse_ms(ms: float | None) -> float | None:
    """``ms`` rounded to its half-octave step (as PathEntry's latency key): jitter is no change."""
    if ms is None:
        return None
    return round(2 ** (round(2 * math.log2(1 + ms)) / 2) - 1, 1)


def facts_of(
    nat: NatInfo | None,
    local: Iterable[str] = (),
    relay_ms: float | None = None,
    serve: tuple[str, int, int] | None = None,
) -> Facts | None:
    """Our facts from the path strategy's NAT view (as ``meshd netcheck``); None before anything is known.

    UDP counts as blocked when a STUN question went unanswered and no STUN server ever answered. When
    every STUN server saw us at one of our own addresses (``local``), there is no NAT: mapping "none"
    (a public address), known from the first answer.
    """
    if nat is None:
        return None
    udp = True if nat.reflexive else (False if nat.stun_unanswered else None)
    varies = nat.mapping_varies_by_dest
    mapping = None if varies is None else ("EDM" if varies else "EIM")
    own = set(local)
    if nat.reflexive and all(host in own for host, _ in nat.reflexive.values()):
        mapping = "none"
    if udp is None and mapping is None and nat.portmap is None and relay_ms is None and serve is None:
        return None
    return Facts(udp, mapping, nat.portmap, coarse_ms(relay_ms), serve)


def summarize(peers: Iterable[PeerStatus], ids: dict[str, int]) -> Summary:
    """The summary of ``meshd status``'s peers; ``ids`` maps peer names to node ids (unknown: skipped)."""
    entries = [
        PathEntry(
            node=ids[p.name],
            path=p.path,
            relay_transport=p.relay_transport if p.path == "relay" else None,
            latency_ms=None if p.latency_ms is None else round(p.latency_ms, 1),
        )
        for p in peers
        if p.name in ids
    ]
    return tuple(sorted(entries, key=lambda e: e.node)[:MAX_PEERS])


def _keys(summary: Summary) -> tuple[tuple[int, str, str | None, int | None], ...]:
    return tuple(e.key() for e in summary)


class Debouncer:
    """Decides when to send: on a change, never sooner than ``interval`` after the last attempt."""

    def __init__(self, interval: float = MIN_INTERVAL) -> None:
        self.interval = interval
        self.sent: Summary | None = None  #: what the coordinator has (None: nothing yet)
        self.sent_facts: Facts | None = None  #: the facts sent with it
        self.last_attempt: float | None = None

    def due(self, summary: Summary, now: float, facts: Facts | None = None) -> Summary | None:
        """The summary to send now, or None (unchanged, facts too, or too soon: ask again later)."""
        if self.sent is not None and _keys(summary) == _keys(self.sent) and facts == self.sent_facts:
            return None
        if self.last_attempt is not None and now - self.last_attempt < self.interval:
            return None
        self.last_attempt = now
        return summary

    def delivered(self, summary: Summary, facts: Facts | None = None) -> None:
        self.sent = summary
        self.sent_facts = facts


async def send(client: ControlClient, summary: Summary, facts: Facts | None = None) -> int:
    """One signed report; answers how many entries the coordinator kept."""
    body: dict[str, Any] = {"peers": [e.to_json() for e in summary]}
    if facts is not None:  # optional: a coordinator without it ignores nothing (reports stay valid)
        body["facts"] = facts.to_json()
    # the client's signed-request plumbing (the same envelope as PUT /api/v1/routes)
    data = (await client._request("PUT", PATH, body, signer=client._need_id())).json()
    return int(data.get("accepted", 0))


async def run(
    client: ControlClient,
    snapshot: Callable[[], Awaitable[Summary]],
    *,
    facts: Callable[[], Facts | None] = lambda: None,
    debouncer: Debouncer | None = None,
    poll: float = POLL,
) -> None:
    """Look at the paths (and our facts) every ``poll`` seconds and report what the debouncer lets through."""
    gate = debouncer or Debouncer()
    loop = asyncio.get_running_loop()
    while True:
        summary = await snapshot()
        ours = facts()
        due = gate.due(summary, loop.time(), ours)
        if due is not None:
            try:
                await send(client, due, ours)
            except ControlError as e:  # the coordinator is away: the next change (or poll) tries again
                log.info("path report not delivered: %s", e)
            else:
                gate.delivered(due, ours)
        await asyncio.sleep(poll)


async def report_loop(daemon: Daemon) -> None:
    """The daemon's supervised task: its status builder gives each peer's path."""
    commands = LocalCommands(daemon)

    async def snapshot() -> Summary:
        assert daemon.applier is not None
        ids = {v.name: v.peer.node_id for v in daemon.applier.verified}
        return summarize((await commands.status()).peers, ids)

    def facts() -> Facts | None:
        relay = daemon.relay
        return facts_of(
            daemon.paths.nat if daemon.paths is not None else None,
            daemon.local_addresses,
            relay.home_rtt_ms() if relay is not None else None,
            daemon.peer_relay_facts(),
        )

    assert daemon._client is not None
    await asyncio.sleep(FIRST_LOOK)
    await run(daemon._client, snapshot, facts=facts)

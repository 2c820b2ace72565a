"""A relay region per replica (issue 16).

Each replica on PostgreSQL runs its embedded relay as a region of its own: `--relay-region-id N`, or
chosen at the first start and kept in ``<state-dir>/relay_region_id`` (so it is stable across restarts):
region 1 when no live replica holds it (a single coordinator keeps the region its nodes know), else the
first free id from AUTO_FIRST. The region is written into the replica's row of ``replicas`` (column
``relay``, the relay map entry as JSON), and every replica's relay map is its own regions (its embedded
relay, the standalone relays that feed it) plus the regions of every other live replica, read from
those rows. A replica that starts, stops or is reaped records a "relays" change: every replica re-reads
the rows and every node gets the new relay map in its next delta.

So a node homed on replica 1's relay and a peer homed on replica 2's relay reach each other as with any
two regions: meshd sends to the peer's home region (meshd/relay/home.py), with a ticket for that region
from its own replica (tickets are signed with the signing key every replica shares, and every replica
knows every node). A node's home (`relay_home`) is a column of ``nodes``, so every replica publishes the
same home for it, also after a restart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from coordinator.db.models import Replica
from coordinator.errors import CoordinatorError
from meshd.proto import netmap
from meshd.proto.netmap import RelayRegion

if TYPE_CHECKING:
    from coordinator.core import Core

log = logging.getLogger("coordinator")

REGION_FILE = "relay_region_id"
#: automatic region ids after region 1: far from the small ids admins give standalone relays (2, 3, ...)
AUTO_FIRST = 1001


class RegionConflict(CoordinatorError):
    """The configured relay region id is another live replica's."""


def region_name(region_id: int) -> str:
    return "default" if region_id == 1 else f"replica-{region_id}"


def encode(region: RelayRegion) -> str:
    return json.dumps(netmap.relay_to_json(region), separators=(",", ":"), sort_keys=True)


def decode(text: str | None) -> RelayRegion | None:
    if not text:
        return None
    try:
        return netmap.relay_from_json(json.loads(text))
    except (ValueError, netmap.NetmapError):
        log.warning("a replica's relay region in the database does not parse; left out of the relay map")
        return None


async def live_regions(session: AsyncSession, floor: float, exclude: str = "") -> dict[int, RelayRegion]:
    """The relay regions of the replicas seen since `floor` (database clock), but replica `exclude`."""
    rows = await session.execute(
        select(Replica.id, Replica.relay).where(Replica.last_seen >= floor, Replica.id != exclude)
    )
    found: dict[int, RelayRegion] = {}
    for _, text in rows.all():
        region = decode(text)
        if region is not None:
            found[region.id] = region
    return found


def choose_id(configured: int, state_dir: Path, url: str, held: dict[int, RelayRegion]) -> int:
    """This replica's region id: `configured` (0: automatic, kept in the state dir). `held`: the live
    replicas' regions. A held id at our own URL is our previous life (a crash less than the timeout ago)."""

    def taken(i: int) -> bool:
        return i in held and held[i].url != url

    if configured:
        if taken(configured):
            raise RegionConflict(
                f"relay region {configured} is held by the live replica at {held[configured].url}; "
                "give every replica its own --relay-region-id"
            )
        return configured
    path = state_dir / REGION_FILE
    try:
        kept = int(path.read_text().strip())
    except (OSError, ValueError):
        kept = 0
    if kept and not taken(kept):
        return kept
    if kept:
        log.warning("relay region %d (from %s) is another live replica's: choosing another", kept, path)
    chosen = (
        1 if not taken(1) else next(i for i in range(AUTO_FIRST, AUTO_FIRST + len(held) + 1) if not taken(i))
    )
    path.write_text(f"{chosen}\n")
    return chosen


def merged(
    current: Iterable[RelayRegion], before: Iterable[int], others: dict[int, RelayRegion]
) -> tuple[RelayRegion, ...]:
    """The relay map: `current` without the other replicas' regions as known `before`, plus `others`
    (this replica's own regions win an id clash)."""
    gone = set(before)
    mine = {r.id: r for r in current if r.id not in gone}
    regions = {**others, **mine}
    return tuple(regions[i] for i in sorted(regions))


async def refresh(core: Core, session: AsyncSession) -> Callable[[], None]:
    """Read the other live replicas' regions (in `session`); returns what puts them in the relay map
    (to run after the commit, or at once when catching up with a commit of another replica)."""
    assert core.presence is not None
    from coordinator.presence import db_now  # it imports this module

    floor = await db_now(session) - core.presence.timeout
    others = await live_regions(session, floor, exclude=core.presence.id)
    if core.relay_region is not None:
        others.pop(core.relay_region.id, None)

    def apply() -> None:
        core.state.relays = merged(core.state.relays, core.replica_regions, others)
        core.replica_regions = others

    return apply

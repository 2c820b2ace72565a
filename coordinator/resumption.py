"""Streams resume across a restart of replicas on PostgreSQL (issue 16).

On SQLite a node's online flag lives in memory, so a start records a "restart" change and streams from
before it get a full map, unless a graceful stop saved the flags (coordinator/onlineflags.py). On
PostgreSQL nothing of the map is held only in memory: nodes, endpoints, routes, policy and DNS records
are rows, online is the `node_presence` rows of live replicas (coordinator/presence.py), a node's relay
home is a column, and every change to any of it is a row of the change log (`map_changes`), which a
starting replica loads. So a stream resuming with ``since=V`` after a restart of one replica or of all of
them gets the delta since V computed from that log (a full map only when V is older than the log's
`change_log_keep` rows), and a crash needs no saved record.

The one thing a crash leaves behind is presence rows of the dead replicas: their nodes were online in
the maps the nodes hold. A starting replica drops those rows and records a "presence" change for each
such node that is not online elsewhere, so the resumed delta says it is offline.

A clean stop leaves its rows on purpose, for presence.LEAVE_GRACE seconds: the restarted replicas take
its nodes as online, so their reconnects are no map changes (coordinator/presence.py, Presence.leave).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.core import Tx


def orphans_offline(tx: Tx, orphans: Iterable[int], online: set[int]) -> list[int]:
    """Record a "presence" change for each node of `orphans` (its presence went with a dead replica) that
    is in the map and not online on a live replica; the ids recorded."""
    peers = tx.core.state.peers
    gone = [i for i in sorted(orphans) if i in peers and i not in online]
    for node_id in gone:
        tx.change("presence", node_id)
    return gone

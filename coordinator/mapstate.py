"""In-memory view of the network map: live peers, the recent change log, and per-node maps and deltas.

The database is the source of truth; this cache is rebuilt from it at start and updated after each
commit, so building a map or a delta for thousands of streams never touches the database. Serialised
peers are cached, and a delta for all nodes that were at the same version is built once.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, replace

from meshd.proto import netmap
from meshd.proto.netmap import Peer, RelayRegion

_DUMPS = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class Change:
    version: int
    kind: str  #: added | changed | endpoints | presence | removed | policy | relays | restart
    node_id: int | None


@dataclass(frozen=True, slots=True)
class PendingDelta:
    """The node-independent part of a delta from `from_version` to `version`."""

    from_version: int
    version: int
    added: tuple[int, ...]
    changed: tuple[int, ...]
    endpoints: tuple[int, ...]
    removed: tuple[int, ...]
    policy: bool
    relays: bool

    @property
    def touched(self) -> frozenset[int]:
        return frozenset((*self.added, *self.changed, *self.endpoints, *self.removed))


class MapState:
    def __init__(self, domain: str, relays: tuple[RelayRegion, ...], log_keep: int = 100_000) -> None:
        self.domain = domain
        self.relays = relays
        self.policy = ""
        self.version = 0
        self.full_map_before = 0  #: a node asking `since` below this gets a full map
        self.peers: dict[int, Peer] = {}
        self.log: deque[Change] = deque(maxlen=log_keep)
        self._peer_json: dict[int, str] = {}
        self._sorted_ids: list[int] | None = None

    # ----------------------------------------------------------------------------------- mutation
    def record(self, change: Change) -> None:
        if change.version <= self.version:
            raise ValueError("change log versions must increase")
        self.version = change.version
        self.log.append(change)
        if change.kind == "restart":
            self.full_map_before = change.version

    def put_peer(self, peer: Peer) -> None:
        if peer.node_id not in self.peers:
            self._sorted_ids = None
        self.peers[peer.node_id] = peer
        self._peer_json.pop(peer.node_id, None)

    def drop_peer(self, node_id: int) -> None:
        if self.peers.pop(node_id, None) is not None:
            self._sorted_ids = None
        self._peer_json.pop(node_id, None)

    def set_endpoints(self, node_id: int, endpoints: tuple[str, ...] | None, online: bool | None) -> bool:
        """Update a peer's endpoints/online flag; True when something changed."""
        peer = self.peers.get(node_id)
        if peer is None:
            return False
        new = replace(
            peer,
            endpoints=peer.endpoints if endpoints is None else endpoints,
            online=peer.online if online is None else online,
        )
        if new == peer:
            return False
        self.put_peer(new)
        return True

    # ------------------------------------------------------------------------------------ reading
    def peer_json(self, node_id: int) -> str:
        text = self._peer_json.get(node_id)
        if text is None:
            text = _DUMPS(netmap.peer_to_json(self.peers[node_id]))
            self._peer_json[node_id] = text
        return text

    def sorted_ids(self) -> list[int]:
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self.peers)
        return self._sorted_ids

    def full_map(self, node_id: int) -> netmap.NetMap:
        return netmap.NetMap(
            version=self.version,
            self_node=self.peers[node_id],
            peers=tuple(self.peers[i] for i in self.sorted_ids() if i != node_id),
            relays=self.relays,
            policy=self.policy,
            domain=self.domain,
        )

    def full_map_message(self, node_id: int) -> str:
        """`{"type":"map",...}` for one node, assembled from cached peer JSON."""
        peers = ",".join(self.peer_json(i) for i in self.sorted_ids() if i != node_id)
        relays = _DUMPS([netmap.relay_to_json(r) for r in self.relays])
        return (
            f'{{"type":"map","map":{{"version":{self.version},"self":{self.peer_json(node_id)},'
            f'"peers":[{peers}],"relays":{relays},"policy":{_DUMPS(self.policy)},'
            f'"domain":{_DUMPS(self.domain)}}}}}'
        )

    def pending_since(self, since: int) -> PendingDelta | None:
        """What changed after `since`, or None when the log no longer reaches back that far."""
        if since < self.full_map_before or since > self.version:
            return None
        if since == self.version:
            return PendingDelta(since, since, (), (), (), (), False, False)
        oldest = self.log[0].version if self.log else self.version + 1
        if since + 1 < oldest:
            return None
        kinds: dict[int, set[str]] = {}
        policy = relays = False
        for change in reversed(self.log):
            if change.version <= since:
                break
            if change.kind == "policy":
                policy = True
            elif change.kind == "relays":
                relays = True
            elif change.node_id is not None:
                kinds.setdefault(change.node_id, set()).add(change.kind)
        added: list[int] = []
        changed: list[int] = []
        endpoints: list[int] = []
        removed: list[int] = []
        for node_id, ks in sorted(kinds.items()):
            if node_id in self.peers:
                if "added" in ks:
                    added.append(node_id)
                elif ks <= {"endpoints", "presence"}:
                    endpoints.append(node_id)
                else:
                    changed.append(node_id)
            elif "added" not in ks:
                removed.append(node_id)
        return PendingDelta(
            since,
            self.version,
            tuple(added),
            tuple(changed),
            tuple(endpoints),
            tuple(removed),
            policy,
            relays,
        )

    def delta_for(self, pending: PendingDelta, node_id: int) -> netmap.Delta:
        """The delta as one node sees it (its own record goes to `self`, never among peers)."""

        def others(ids: tuple[int, ...]) -> tuple[Peer, ...]:
            return tuple(self.peers[i] for i in ids if i != node_id)

        self_node = self.peers.get(node_id) if node_id in pending.touched else None
        return netmap.Delta(
            from_version=pending.from_version,
            version=pending.version,
            peers_added=others(pending.added),
            peers_changed=others(pending.changed),
            peers_removed=tuple(i for i in pending.removed if i != node_id),
            endpoints_changed=tuple(
                (i, self.peers[i].endpoints, self.peers[i].online) for i in pending.endpoints if i != node_id
            ),
            self_node=self_node,
            relays=self.relays if pending.relays else None,
            policy=self.policy if pending.policy else None,
        )

    def delta_message(self, pending: PendingDelta, node_id: int) -> str:
        return netmap.encode_server_message(netmap.DeltaMessage(self.delta_for(pending, node_id)))

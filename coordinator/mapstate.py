"""In-memory view of the network map: live peers, the recent change log, and per-node maps and deltas.

The database is the source of truth; this cache is rebuilt from it at start and updated after each
commit, so building a map or a delta for thousands of streams never touches the database. Serialised
peers are cached, and a delta for all nodes that were at the same version is built once.

Maps and deltas are signed for their recipient with the active signing key (format and what it binds:
meshd.proto.netmap). Bodies are built in canonical JSON (sorted keys, compact, UTF-8) so that the bytes
sent are the bytes signed; the SHA-256 of a shared delta body is taken once, the signature per node.
Least knowledge: the policy text stays here; a node gets only its visible peers and its inbound rules.

Views (issue 16): nodes that stand in the same place in every policy rule see the same peers (apart from
each other) and get the same inbound rules; they share a view token derived from the policy and that place
(so every replica derives the same one). A delta that touches none of a view's members is
built, signed and encoded once for the view (meshd.proto.netmap, "Shared deltas"); the hub writes those
bytes to every stream of the view. Anything added to a map that differs per recipient must be part of
the view token (:meth:`MapState.view_of`), or it would be shared across recipients.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from nacl.signing import SigningKey

from coordinator import policy as access
from meshd.proto import netmap
from meshd.proto import policy as rules
from meshd.proto.netmap import Peer, RelayRegion

log = logging.getLogger("coordinator.mapstate")

#: canonical JSON (meshd.proto.encoding.canonical_json) as text: what is signed is what is sent
_DUMPS = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode


#: the view token of every node when no policy is set (the token of "sees all, allows all" with a policy)
_ONE_VIEW = hashlib.sha256(
    b"meshvpn view v1\nall\n" + _DUMPS(rules.rules_to_json(rules.ALLOW_ALL)).encode()
).hexdigest()[: netmap.VIEW_CHARS]


def _membership(compiled: access.Compiled, node_id: int) -> bytes:
    """Where `node_id` stands in each compiled rule: in its sources, in each of its destinations."""
    out = bytearray()
    for _, src_ids, _, dsts in compiled._rules:  # the policy's own compiled form (policy.py)
        out.append(2 if src_ids is None else int(node_id in src_ids))
        out.extend(int(node_id in ids) for _, ids in dsts)
        out.append(255)
    return bytes(out)


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
    dns: bool = False  #: the admin DNS records changed (every node gets them)

    @property
    def touched(self) -> frozenset[int]:
        return frozenset((*self.added, *self.changed, *self.endpoints, *self.removed))


class MapState:
    def __init__(
        self,
        domain: str,
        relays: tuple[RelayRegion, ...],
        log_keep: int = 100_000,
        signing_seed: Callable[[], bytes] | None = None,
    ) -> None:
        """`signing_seed`: the active signing key's seed, read at each message (it changes on rotation);
        None sends maps unsigned (unit tests of this module only)."""
        self.domain = domain
        self.signing_seed = signing_seed
        self._signing_key: tuple[bytes, SigningKey] | None = None
        self.relays = relays
        self._policy_text = ""
        self._policy: access.Policy | None = None
        self._compiled: access.Compiled | None = None
        self.owners: dict[int, str] = {}  #: node id -> user name (policy: a user's nodes)
        #: admin DNS records (name, ip) sorted by name, in every map (coordinator/dnsrecords.py)
        self.dns_records: tuple[tuple[str, str], ...] = ()
        #: node id -> approved and advertised prefixes it routes (coordinator/routes.py); put_peer fills
        #: them into the node's Peer, so every place that rebuilds a Peer from its row keeps them
        self.routes: dict[int, tuple[str, ...]] = {}
        #: node id -> its own netcheck facts from its last path report (issue 15; memory only, like the
        #: reports): put_peer fills them into the node's Peer, so peers learn why a path is relayed
        self.nat: dict[int, netmap.PeerNat] = {}
        self.version = 0
        self.full_map_before = 0  #: a node asking `since` below this gets a full map
        self.peers: dict[int, Peer] = {}
        self.log: deque[Change] = deque(maxlen=log_keep)
        self._peer_json: dict[int, str] = {}
        self._sorted_ids: list[int] | None = None
        #: view tokens per node, valid for the Compiled object they were derived from
        self._views: tuple[access.Compiled, dict[int, str]] | None = None

    # ------------------------------------------------------------------------------------- policy
    @property
    def policy(self) -> str:
        return self._policy_text

    @policy.setter
    def policy(self, text: str) -> None:
        """Set the policy text ("" = none: allow all). Stored text that no longer parses denies all."""
        self._policy_text = text
        if not text.strip():
            self._policy = None
        else:
            try:
                self._policy, legacy = access.parse_stored(text)
                if legacy:
                    log.warning(
                        "stored policy uses bare names (read as user:NAME); "
                        "write user:NAME or node:NAME and run `coordinator policy set` again"
                    )
            except access.PolicyError as exc:
                log.warning("stored policy does not parse, denying all traffic: %s", exc.problems[0])
                self._policy = access.Policy()
        self._compiled = None

    @property
    def parsed_policy(self) -> access.Policy | None:
        return self._policy

    @property
    def filtering(self) -> bool:
        """A policy is set: maps and deltas differ per node."""
        return self._policy is not None

    def member(self, node_id: int) -> access.Member:
        p = self.peers[node_id]
        return access.Member(
            node_id,
            p.name,
            self.owners.get(node_id, ""),
            frozenset(access.tag_name(t) for t in p.tags),
            tuple(ipaddress.ip_network(ip, strict=False) for ip in p.ips),
            tuple(ipaddress.ip_network(r) for r in p.routes),
        )

    @property
    def compiled(self) -> access.Compiled:
        if self._compiled is None:
            members = [self.member(i) for i in self.sorted_ids()] if self._policy is not None else []
            self._compiled = access.Compiled(self._policy, members)
        return self._compiled

    def visible_ids(self, node_id: int) -> list[int]:
        seen = self.compiled.visible(node_id)
        return [i for i in self.sorted_ids() if i != node_id and (seen is None or i in seen)]

    def inbound(self, node_id: int) -> tuple[rules.InboundRule, ...]:
        return self.compiled.inbound(node_id) if node_id in self.peers else rules.ALLOW_ALL

    def view_of(self, node_id: int) -> str:
        """The node's view token. Nodes that stand in the same place in every rule of the policy (source
        or not, each destination or not) see the same peers apart from each other and get the same
        inbound rules: a delta that names none of them is the same for all of them. The token is a digest
        of the policy and that place, O(rules) per node; without a policy every node has one view."""
        if self._policy is None:
            return _ONE_VIEW  # no policy: every map holds every peer and allows everything in
        compiled = self.compiled
        if self._views is None or self._views[0] is not compiled:
            self._views = (compiled, {})
        views = self._views[1]
        token = views.get(node_id)
        if token is None:
            h = hashlib.sha256(b"meshvpn view v1\n" + self._policy_text.encode())
            h.update(_membership(compiled, node_id) if node_id in self.peers else b"gone")
            token = views[node_id] = h.hexdigest()[: netmap.VIEW_CHARS]
        return token

    # ----------------------------------------------------------------------------------- mutation
    def record(self, change: Change) -> None:
        if change.version <= self.version:
            raise ValueError("change log versions must increase")
        self.version = change.version
        self.log.append(change)
        if change.kind == "restart":
            self.full_map_before = change.version

    def put_peer(self, peer: Peer) -> None:
        routes = self.routes.get(peer.node_id, ())
        if peer.routes != routes:
            peer = replace(peer, routes=routes)
        nat = self.nat.get(peer.node_id)
        if peer.nat != nat:
            peer = replace(peer, nat=nat)
        old = self.peers.get(peer.node_id)
        if old is None:
            self._sorted_ids = None
        if old is None or (old.name, old.ips, old.tags, old.routes) != (
            peer.name,
            peer.ips,
            peer.tags,
            routes,
        ):
            self._compiled = None
        self.peers[peer.node_id] = peer
        self._peer_json.pop(peer.node_id, None)

    def set_routes(self, node_id: int, routes: tuple[str, ...]) -> None:
        """The prefixes `node_id` routes now (record a "changed" change for it in the same transaction)."""
        if routes:
            self.routes[node_id] = routes
        else:
            self.routes.pop(node_id, None)
        if node_id in self.peers:
            self.put_peer(self.peers[node_id])

    def set_nat(self, node_id: int, nat: netmap.PeerNat | None) -> None:
        """The node's netcheck facts now (record a "changed" change for it in the same transaction)."""
        if nat is not None:
            self.nat[node_id] = nat
        else:
            self.nat.pop(node_id, None)
        if node_id in self.peers:
            self.put_peer(self.peers[node_id])

    def drop_peer(self, node_id: int) -> None:
        self.routes.pop(node_id, None)
        self.nat.pop(node_id, None)
        if self.peers.pop(node_id, None) is not None:
            self._sorted_ids = None
            self._compiled = None
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
            peers=tuple(self.peers[i] for i in self.visible_ids(node_id)),
            relays=self.relays,
            policy="",  # least knowledge: the policy reaches a node as peers and inbound rules only
            domain=self.domain,
            inbound=self.inbound(node_id),
            dns_records=self.dns_records,
            view=self.view_of(node_id),
        )

    def full_map_message(self, node_id: int) -> str:
        """`{"type":"map",...}` for one node, signed for it, assembled from cached peer JSON."""
        peers = ",".join(self.peer_json(i) for i in self.visible_ids(node_id))
        relays = _DUMPS([netmap.relay_to_json(r) for r in self.relays])
        inbound = _DUMPS(rules.rules_to_json(self.inbound(node_id)))
        dns = f'"dns":{_DUMPS(netmap.records_to_json(self.dns_records))},' if self.dns_records else ""
        body = (  # keys in sorted order: canonical JSON, equal to canonical_json(map_to_json(full_map))
            f'{{{dns}"domain":{_DUMPS(self.domain)},"inbound":{inbound},"peers":[{peers}],"relays":{relays},'
            f'"self":{self.peer_json(node_id)},"version":{self.version},"view":"{self.view_of(node_id)}"}}'
        )
        return self.signed("map", body, node_id)

    def signed(self, kind: str, body: str, node_id: int, digest: bytes | None = None) -> str:
        """The message for a canonical map/delta `body`, signed for `node_id` (unsigned without a key)."""
        if self.signing_seed is None:
            return f'{{"type":"{kind}","{kind}":{body}}}'
        return netmap.sign_body(kind, body, node_id, self._key(), digest)

    def _key(self) -> SigningKey:
        assert self.signing_seed is not None
        seed = self.signing_seed()
        if self._signing_key is None or self._signing_key[0] != seed:
            self._signing_key = (seed, SigningKey(seed))  # expanded once per key, not per message
        return self._signing_key[1]

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
        policy = relays = dns = False
        for change in reversed(self.log):
            if change.version <= since:
                break
            if change.kind == "policy":
                policy = True
            elif change.kind == "relays":
                relays = True
            elif change.kind == "dns":
                dns = True
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
            else:  # gone now (even if added and removed again since `since`: it may have been in the old map)
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
            dns,
        )

    def delta_for(self, pending: PendingDelta, node_id: int) -> netmap.Delta:
        """The delta as one node sees it (its own record goes to `self`, never among peers).

        With a policy, only peers the node may talk to are sent; peers it may no longer see are removed.
        After a policy change or a change of the node itself (tags), every visible peer is upserted and
        every other one removed, which is right whatever the node had before.
        """
        seen = self.compiled.visible(node_id) if node_id in self.peers else None

        def ok(i: int) -> bool:
            return i != node_id and (seen is None or i in seen)

        def others(ids: tuple[int, ...] | list[int]) -> tuple[Peer, ...]:
            return tuple(self.peers[i] for i in ids if ok(i))

        self_node = self.peers.get(node_id) if node_id in pending.touched else None
        structural = pending.policy or bool(pending.added or pending.changed or pending.removed)
        if pending.policy or (node_id in pending.changed and self.filtering):
            added: tuple[Peer, ...] = ()
            changed = others(self.sorted_ids())
            hidden = tuple(i for i in self.sorted_ids() if i != node_id and not ok(i))
            removed = tuple(i for i in (*pending.removed, *hidden) if i != node_id)
        else:
            added, changed = others(pending.added), others(pending.changed)
            hidden = tuple(i for i in pending.changed if i != node_id and not ok(i))
            removed = tuple(i for i in (*pending.removed, *hidden) if i != node_id)
        return netmap.Delta(
            from_version=pending.from_version,
            version=pending.version,
            peers_added=added,
            peers_changed=changed,
            peers_removed=tuple(dict.fromkeys(removed)),
            endpoints_changed=tuple(
                (i, self.peers[i].endpoints, self.peers[i].online) for i in pending.endpoints if ok(i)
            ),
            self_node=self_node,
            relays=self.relays if pending.relays else None,
            dns_records=self.dns_records if pending.dns else None,
            inbound=self.inbound(node_id) if structural and (self.filtering or pending.policy) else None,
            view=self.view_of(node_id) if node_id in self.peers else None,
        )

    def delta_body(self, pending: PendingDelta, node_id: int) -> str:
        """The delta's canonical JSON (node -1: the shared form for nodes the change does not touch)."""
        return _DUMPS(netmap.delta_to_json(self.delta_for(pending, node_id)))

    def delta_message(self, pending: PendingDelta, node_id: int) -> str:
        return self.signed("delta", self.delta_body(pending, node_id), node_id)

    def shareable(self, pending: PendingDelta, node_id: int) -> bool:
        """Whether `node_id` (told its current view) may get the delta shared by its view: the change
        touches neither the node nor everyone's view (a policy change)."""
        return not pending.policy and node_id not in pending.touched

    def shared_delta_message(self, pending: PendingDelta, node_id: int) -> str:
        """The delta for every member of `node_id`'s view that :meth:`shareable` allows, signed once for
        the view (built from one member: for those members the delta does not depend on which one)."""
        delta = replace(self.delta_for(pending, node_id), view=None)
        # Every node the change touched must be named, so that it refuses this delta (its own comes
        # signed for it). Those the view does not see are named as removals: a no-op for the members.
        named = {*delta.peers_removed, *(i for i, _, _ in delta.endpoints_changed)}
        named.update(p.node_id for p in (*delta.peers_added, *delta.peers_changed))
        if unnamed := sorted(pending.touched - named):
            delta = replace(delta, peers_removed=(*delta.peers_removed, *unnamed))
        body = _DUMPS(netmap.delta_to_json(delta))
        view = self.view_of(node_id)
        if self.signing_seed is None:
            return f'{{"type":"delta","delta":{body},"view":"{view}"}}'
        return netmap.sign_view_body(body, view, self._key())

"""The network map a node receives from the coordinator, its deltas, and the stream messages.

A :class:`NetMap` is everything one node needs: itself, its peers, the relay map and the policy, at a
global version. After the full map, the coordinator sends :class:`Delta` values; ``apply(old, diff(old,
new)) == new`` for any two maps of the same node. JSON codecs are strict: anything malformed raises
:class:`NetmapError` and nothing else.

Stream messages (one JSON object per WebSocket text message, or per long-poll response):

server -> node: ``{"type": "map", "map": {...}}``, ``{"type": "delta", "delta": {...}}``,
``{"type": "signal", "from": <node id>, "payload": {...}}``, ``{"type": "error", "message": "..."}``
node -> server: ``{"type": "endpoints", "candidates": ["ip:port", ...]}``,
``{"type": "signal", "to": <node id>, "payload": {...}}``
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, replace
from typing import Any

from meshd.proto.policy import ALLOW_ALL, InboundRule, RuleError, rules_from_json, rules_to_json

MAX_MESSAGE_BYTES = 64 * 1024
MAX_CANDIDATES = 32


class CloseCode(enum.IntEnum):
    """WebSocket close codes of the map stream (the coordinator sends them, meshd acts on them)."""

    POLICY = 1008  #: the handshake signature was refused
    RESTART = 1012  #: the coordinator is shutting down: reconnect later with since=V
    UNAUTHORIZED = 4401  #: the request was not authenticated
    REVOKED = 4403  #: the node was removed or expired: do not reconnect
    TOO_SLOW = 4408  #: the node did not keep up with its stream: reconnect with since=V


#: ControlError statuses (HTTP or close code) after which meshd asks whether it was removed
REFUSED = frozenset({401, 403, CloseCode.UNAUTHORIZED, CloseCode.REVOKED})


class NetmapError(ValueError):
    """A map, delta or stream message is malformed."""


@dataclass(frozen=True, slots=True)
class Peer:
    """One node as others see it (also used for the node itself)."""

    node_id: int
    name: str
    ips: tuple[str, ...]  #: "100.64.0.1/32", "fd..::1/128"
    wg_public_key: str
    node_public_key: str
    cert: str
    endpoints: tuple[str, ...] = ()  #: candidate "ip:port" strings reported by the node
    relay_home: int | None = None  #: relay region id the node is attached to
    online: bool = False
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RelayRegion:
    """A relay (DERP-style) region and its STUN port."""

    id: int
    name: str
    url: str
    stun_port: int


@dataclass(frozen=True, slots=True)
class NetMap:
    """The full map for one node at `version`; peers sorted by node id, never containing self."""

    version: int
    self_node: Peer
    peers: tuple[Peer, ...]
    relays: tuple[RelayRegion, ...]
    policy: str  #: policy text; "" means no policy set (everything allowed)
    domain: str
    inbound: tuple[InboundRule, ...] = ALLOW_ALL  #: what this node lets in (meshd/firewall.py)


@dataclass(frozen=True, slots=True)
class Delta:
    """What changed between two versions of one node's map. ``None`` fields mean unchanged."""

    from_version: int
    version: int
    peers_added: tuple[Peer, ...] = ()
    peers_changed: tuple[Peer, ...] = ()
    peers_removed: tuple[int, ...] = ()
    endpoints_changed: tuple[tuple[int, tuple[str, ...], bool], ...] = ()  #: (node id, endpoints, online)
    self_node: Peer | None = None
    relays: tuple[RelayRegion, ...] | None = None
    policy: str | None = None
    domain: str | None = None
    inbound: tuple[InboundRule, ...] | None = None

    def is_empty(self) -> bool:
        return not (
            self.peers_added
            or self.peers_changed
            or self.peers_removed
            or self.endpoints_changed
            or self.self_node is not None
            or self.relays is not None
            or self.policy is not None
            or self.domain is not None
            or self.inbound is not None
        )


def diff(old: NetMap, new: NetMap) -> Delta:
    """The delta that turns `old` into `new` (endpoint/online-only changes use the compact form)."""
    before = {p.node_id: p for p in old.peers}
    after = {p.node_id: p for p in new.peers}
    added = tuple(p for i, p in sorted(after.items()) if i not in before)
    removed = tuple(i for i in sorted(before) if i not in after)
    changed: list[Peer] = []
    endpoints: list[tuple[int, tuple[str, ...], bool]] = []
    for i, p in sorted(after.items()):
        q = before.get(i)
        if q is None or q == p:
            continue
        if replace(q, endpoints=p.endpoints, online=p.online) == p:
            endpoints.append((i, p.endpoints, p.online))
        else:
            changed.append(p)
    return Delta(
        from_version=old.version,
        version=new.version,
        peers_added=added,
        peers_changed=tuple(changed),
        peers_removed=removed,
        endpoints_changed=tuple(endpoints),
        self_node=new.self_node if new.self_node != old.self_node else None,
        relays=new.relays if new.relays != old.relays else None,
        policy=new.policy if new.policy != old.policy else None,
        domain=new.domain if new.domain != old.domain else None,
        inbound=new.inbound if new.inbound != old.inbound else None,
    )


def apply(current: NetMap, delta: Delta) -> NetMap:
    """The map after `delta`. Added/changed peers are upserts; unknown ids in removals are ignored."""
    peers = {p.node_id: p for p in current.peers}
    for i in delta.peers_removed:
        peers.pop(i, None)
    for p in (*delta.peers_added, *delta.peers_changed):
        peers[p.node_id] = p
    for i, endpoints, online in delta.endpoints_changed:
        if i in peers:
            peers[i] = replace(peers[i], endpoints=endpoints, online=online)
    self_node = delta.self_node if delta.self_node is not None else current.self_node
    peers.pop(self_node.node_id, None)
    return NetMap(
        version=delta.version,
        self_node=self_node,
        peers=tuple(p for _, p in sorted(peers.items())),
        relays=delta.relays if delta.relays is not None else current.relays,
        policy=delta.policy if delta.policy is not None else current.policy,
        domain=delta.domain if delta.domain is not None else current.domain,
        inbound=delta.inbound if delta.inbound is not None else current.inbound,
    )


# ---------------------------------------------------------------------------------------------- JSON codec


def peer_to_json(p: Peer) -> dict[str, Any]:
    return {
        "node_id": p.node_id,
        "name": p.name,
        "ips": list(p.ips),
        "wg_public_key": p.wg_public_key,
        "node_public_key": p.node_public_key,
        "cert": p.cert,
        "endpoints": list(p.endpoints),
        "relay_home": p.relay_home,
        "online": p.online,
        "tags": list(p.tags),
    }


def relay_to_json(r: RelayRegion) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "url": r.url, "stun_port": r.stun_port}


def map_to_json(m: NetMap) -> dict[str, Any]:
    return {
        "version": m.version,
        "self": peer_to_json(m.self_node),
        "peers": [peer_to_json(p) for p in m.peers],
        "relays": [relay_to_json(r) for r in m.relays],
        "policy": m.policy,
        "domain": m.domain,
        "inbound": rules_to_json(m.inbound),
    }


def delta_to_json(d: Delta) -> dict[str, Any]:
    out: dict[str, Any] = {"from_version": d.from_version, "version": d.version}
    if d.peers_added:
        out["peers_added"] = [peer_to_json(p) for p in d.peers_added]
    if d.peers_changed:
        out["peers_changed"] = [peer_to_json(p) for p in d.peers_changed]
    if d.peers_removed:
        out["peers_removed"] = list(d.peers_removed)
    if d.endpoints_changed:
        out["endpoints_changed"] = [
            {"node_id": i, "endpoints": list(e), "online": o} for i, e, o in d.endpoints_changed
        ]
    if d.self_node is not None:
        out["self"] = peer_to_json(d.self_node)
    if d.relays is not None:
        out["relays"] = [relay_to_json(r) for r in d.relays]
    if d.policy is not None:
        out["policy"] = d.policy
    if d.domain is not None:
        out["domain"] = d.domain
    if d.inbound is not None:
        out["inbound"] = rules_to_json(d.inbound)
    return out


def _get(raw: dict[str, Any], key: str, kind: type, where: str, optional: bool = False) -> Any:
    if key not in raw:
        if optional:
            return None
        raise NetmapError(f"{where}: missing field {key}")
    value = raw[key]
    if kind is int and isinstance(value, bool):
        raise NetmapError(f"{where}: field {key} must be int")
    if not isinstance(value, kind):
        raise NetmapError(f"{where}: field {key} must be {kind.__name__}")
    return value


def _obj(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise NetmapError(f"{where}: expected an object")
    return raw


def _strs(raw: dict[str, Any], key: str, where: str, limit: int = 1024) -> tuple[str, ...]:
    values = _get(raw, key, list, where)
    if len(values) > limit or not all(isinstance(v, str) for v in values):
        raise NetmapError(f"{where}: field {key} must be a list of at most {limit} strings")
    return tuple(values)


def _list(raw: dict[str, Any], key: str, where: str) -> list[Any]:
    value: list[Any] = _get(raw, key, list, where, optional=True) or []
    return value


def peer_from_json(raw: Any, where: str = "peer") -> Peer:
    o = _obj(raw, where)
    relay = o.get("relay_home")
    if relay is not None and (not isinstance(relay, int) or isinstance(relay, bool)):
        raise NetmapError(f"{where}: field relay_home must be int or null")
    return Peer(
        node_id=_get(o, "node_id", int, where),
        name=_get(o, "name", str, where),
        ips=_strs(o, "ips", where),
        wg_public_key=_get(o, "wg_public_key", str, where),
        node_public_key=_get(o, "node_public_key", str, where),
        cert=_get(o, "cert", str, where),
        endpoints=_strs(o, "endpoints", where),
        relay_home=relay,
        online=_get(o, "online", bool, where),
        tags=_strs(o, "tags", where),
    )


def relay_from_json(raw: Any) -> RelayRegion:
    from meshd.proto.relay import region_problem  # here: the relay codec is not needed for the rest

    o = _obj(raw, "relay")
    region = RelayRegion(
        id=_get(o, "id", int, "relay"),
        name=_get(o, "name", str, "relay"),
        url=_get(o, "url", str, "relay"),
        stun_port=_get(o, "stun_port", int, "relay"),
    )
    # a region meshd cannot use (``http://[`` raised ValueError deep in meshd and killed the stream task)
    if (problem := region_problem(region.id, region.name, region.url, region.stun_port)) is not None:
        raise NetmapError(f"relay {str(region.id)[:20]}: {problem}")
    return region


def _inbound(o: dict[str, Any], where: str) -> tuple[InboundRule, ...] | None:
    if "inbound" not in o:
        return None
    try:
        return rules_from_json(o["inbound"])
    except RuleError as exc:
        raise NetmapError(f"{where}: {exc}") from None


def map_from_json(raw: Any) -> NetMap:
    o = _obj(raw, "map")
    inbound = _inbound(o, "map")
    return NetMap(
        version=_get(o, "version", int, "map"),
        self_node=peer_from_json(o.get("self"), "map.self"),
        peers=tuple(sorted((peer_from_json(p) for p in _get(o, "peers", list, "map")), key=_node_id)),
        relays=tuple(relay_from_json(r) for r in _get(o, "relays", list, "map")),
        policy=_get(o, "policy", str, "map"),
        domain=_get(o, "domain", str, "map"),
        inbound=ALLOW_ALL if inbound is None else inbound,
    )


def delta_from_json(raw: Any) -> Delta:
    o = _obj(raw, "delta")
    removed = _list(o, "peers_removed", "delta")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in removed):
        raise NetmapError("delta: peers_removed must be a list of node ids")
    endpoints: list[tuple[int, tuple[str, ...], bool]] = []
    for e in _list(o, "endpoints_changed", "delta"):
        eo = _obj(e, "delta.endpoints_changed")
        endpoints.append(
            (
                _get(eo, "node_id", int, "delta.endpoints_changed"),
                _strs(eo, "endpoints", "delta.endpoints_changed"),
                _get(eo, "online", bool, "delta.endpoints_changed"),
            )
        )
    relays = _get(o, "relays", list, "delta", optional=True)
    return Delta(
        from_version=_get(o, "from_version", int, "delta"),
        version=_get(o, "version", int, "delta"),
        peers_added=tuple(peer_from_json(p) for p in _list(o, "peers_added", "delta")),
        peers_changed=tuple(peer_from_json(p) for p in _list(o, "peers_changed", "delta")),
        peers_removed=tuple(removed),
        endpoints_changed=tuple(endpoints),
        self_node=peer_from_json(o["self"], "delta.self") if "self" in o else None,
        relays=tuple(relay_from_json(r) for r in relays) if relays is not None else None,
        policy=_get(o, "policy", str, "delta", optional=True),
        domain=_get(o, "domain", str, "delta", optional=True),
        inbound=_inbound(o, "delta"),
    )


def _node_id(p: Peer) -> int:
    return p.node_id


# ------------------------------------------------------------------------------------------ stream messages


@dataclass(frozen=True, slots=True)
class MapMessage:
    map: NetMap


@dataclass(frozen=True, slots=True)
class DeltaMessage:
    delta: Delta


@dataclass(frozen=True, slots=True)
class SignalMessage:
    """Node-to-node signalling (candidates, "call me maybe"); `peer` is `to` going up, `from` coming down."""

    peer: int
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EndpointsMessage:
    candidates: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    message: str


ServerMessage = MapMessage | DeltaMessage | SignalMessage | ErrorMessage
ClientMessage = EndpointsMessage | SignalMessage


def encode_server_message(msg: ServerMessage) -> str:
    if isinstance(msg, MapMessage):
        return json.dumps({"type": "map", "map": map_to_json(msg.map)}, separators=(",", ":"))
    if isinstance(msg, DeltaMessage):
        return json.dumps({"type": "delta", "delta": delta_to_json(msg.delta)}, separators=(",", ":"))
    if isinstance(msg, SignalMessage):
        return json.dumps({"type": "signal", "from": msg.peer, "payload": msg.payload}, separators=(",", ":"))
    return json.dumps({"type": "error", "message": msg.message})


def encode_client_message(msg: ClientMessage) -> str:
    if isinstance(msg, EndpointsMessage):
        return json.dumps({"type": "endpoints", "candidates": list(msg.candidates)})
    return json.dumps({"type": "signal", "to": msg.peer, "payload": msg.payload})


def _load(text: str | bytes) -> dict[str, Any]:
    if len(text) > MAX_MESSAGE_BYTES:
        raise NetmapError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise NetmapError("message is not JSON") from None
    return _obj(raw, "message")


def decode_client_message(text: str | bytes) -> ClientMessage:
    """Parse a node->server message (bounded size, strict types)."""
    o = _load(text)
    kind = o.get("type")
    if kind == "endpoints":
        candidates = _strs(o, "candidates", "endpoints", limit=MAX_CANDIDATES)
        if any(len(c) > 64 for c in candidates):
            raise NetmapError("endpoints: candidate longer than 64 characters")
        return EndpointsMessage(candidates)
    if kind == "signal":
        return SignalMessage(_get(o, "to", int, "signal"), _get(o, "payload", dict, "signal"))
    raise NetmapError(f"unknown message type {kind!r}")


def decode_server_message(text: str | bytes, max_bytes: int = 256 * 1024 * 1024) -> ServerMessage:
    """Parse a server->node message."""
    if len(text) > max_bytes:
        raise NetmapError("message too large")
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise NetmapError("message is not JSON") from None
    o = _obj(raw, "message")
    kind = o.get("type")
    if kind == "map":
        return MapMessage(map_from_json(o.get("map")))
    if kind == "delta":
        return DeltaMessage(delta_from_json(o.get("delta")))
    if kind == "signal":
        return SignalMessage(_get(o, "from", int, "signal"), _get(o, "payload", dict, "signal"))
    if kind == "error":
        return ErrorMessage(_get(o, "message", str, "error"))
    raise NetmapError(f"unknown message type {kind!r}")

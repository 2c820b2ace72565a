"""The network map a node receives from the coordinator, its deltas, and the stream messages.

A :class:`NetMap` is everything one node needs: itself, the peers it may talk to, the relay map and its
own inbound rules, at a global version. After the full map, the coordinator sends :class:`Delta` values;
``apply(old, diff(old, new)) == new`` for any two maps of the same node. JSON codecs are strict: anything
malformed raises :class:`NetmapError` and nothing else.

Least knowledge: a map carries no policy text (users, groups, host aliases, rules, tests); the policy
reaches a node only as the peers it may see and its own ``inbound`` rules (CIDRs and ports). A ``policy``
field from an older coordinator is accepted and dropped on decode.

Stream messages (one JSON object per WebSocket text message, or per long-poll response; on the stream a
message of COMPRESS_AT characters or more comes as a binary frame of its zlib-compressed text instead:
:func:`frame_server_message`, :func:`inflate_frame`). Peer records are map format 2 (:func:`peer_to_json`:
one-letter keys, the certificate as signature and validity); meshd asks for the format with ``proto=2``
in the stream and long-poll query, and the coordinator refuses a node that does not (CloseCode.OUTDATED).

server -> node: ``{"type": "map", "map": {...}, "key": <key id>, "sig": <b64>}``,
``{"type": "delta", "delta": {...}, "key": <key id>, "sig": <b64>}``,
``{"type": "signal", "from": <node id>, "payload": {...}}``, ``{"type": "error", "message": "..."}``
node -> server: ``{"type": "endpoints", "candidates": ["ip:port", ...]}``,
``{"type": "signal", "to": <node id>, "payload": {...}}``

Signed maps. Every full map and every delta is signed on its own (Ed25519, RFC 8032) by the coordinator's
active signing key, the key that issues node certificates and that meshd pins at enrollment (rotation:
meshd.proto.trust). ``key`` is that key's id (meshd.proto.cert.key_id); ``sig`` is::

    Ed25519(seed, b"meshvpn netmap v1\n" + kind + b" " + str(node_id) + b"\n" + SHA-256(body))

where ``kind`` is ``map`` or ``delta``, ``node_id`` the recipient, and ``body`` the canonical JSON
(meshd.proto.encoding.canonical_json) of the ``map``/``delta`` object. The coordinator emits that object
already in canonical form, so it signs the exact bytes it sends; the node re-encodes what it parsed
canonically, which gives back the same bytes when nothing was changed. What that binds:

- the content: every field, including the ones no certificate covers (``inbound``, ``relays``,
  endpoints, ``relay_home``, ``online``, peers' ``node_public_key``);
- the recipient: a map or delta for node A does not verify as one for node B;
- the version: ``version`` (and a delta's ``from_version``) are inside the body. The node takes a full
  map only at a version not below the one it holds and a delta only when ``from_version`` is exactly the
  version it holds (:func:`check_order`), so an old map or delta cannot be replayed later.

Why one signature per message rather than a hash chain: a chain anchored by one signature would save the
~50 µs per message but ties every message to the previous one per node; a lost or refused message and
every reconnect with ``since=V`` (full map or a delta from an older version) would need a new anchor
anyway. Per-message signatures keep each message verifiable on its own. The hash is taken once per body
(a full map can be a megabyte), the signature per recipient. Signals and error messages are not signed
(they configure nothing); the floor of versions lives in memory, so a freshly started meshd accepts any
correctly signed map for itself (at worst an older one, until the next delta or reconnect).

Shared deltas (issue 16). Nodes that see the same peers and inbound rules share a *view token* (16 hex
digits; the coordinator derives it from what the view contains). Every full map carries the recipient's
token (``view``), and a node-signed delta carries it again whenever it may have changed. A delta that
touches none of the recipients themselves is signed once for the token instead of once per node, so the
coordinator writes the same bytes to every stream of that view::

    {"type": "delta", "delta": {...}, "key": <key id>, "view": <token>, "sig": <b64>}
    sig = Ed25519(seed, b"meshvpn netmap v1\n" + b"delta view:" + token + b"\n" + SHA-256(body))

A node accepts such a delta only when (:func:`verify`, given the map it holds) the token is the one in
its own node-signed map, the delta neither names the node (added, changed, removed or endpoints) nor
carries ``self`` or ``view``, and ``from_version`` is exactly its version (:func:`check_order`). So a
shared delta is accepted only by a node to which the coordinator would have sent those exact bytes: one
in that view, at that version, not touched by the change (a touched node gets a node-signed delta). A
full map is never shared. The token is bound by the node-signed messages that carry it, so a node cannot
be moved into another view by an attacker.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from meshd.proto import cert
from meshd.proto.cert import key_id
from meshd.proto.encoding import b64decode, b64encode, canonical_json
from meshd.proto.policy import ALLOW_ALL, InboundRule, RuleError, rules_from_json, rules_to_json

MAX_MESSAGE_BYTES = 64 * 1024
MAX_CANDIDATES = 32
VIEW_CHARS = 16  #: hex digits of a view token
SIG_CONTEXT = b"meshvpn netmap v1\n"


class CloseCode(enum.IntEnum):
    """WebSocket close codes of the map stream (the coordinator sends them, meshd acts on them)."""

    POLICY = 1008  #: the handshake signature was refused
    RESTART = 1012  #: the coordinator is shutting down: reconnect later with since=V
    #: the node has MAX_STREAMS_PER_NODE streams open already: "try again later" (RFC 6455), so meshd backs
    #: off and retries as after any network error (4403 would make it think it was removed)
    TOO_MANY_STREAMS = 1013
    UNAUTHORIZED = 4401  #: the request was not authenticated
    REVOKED = 4403  #: the node was removed or expired: do not reconnect
    TOO_SLOW = 4408  #: the node did not keep up with its stream: reconnect with since=V
    OUTDATED = 4426  #: the node did not ask for MAP_FORMAT (?proto=2): meshd is older than the coordinator


#: ControlError statuses (HTTP or close code) after which meshd asks whether it was removed
REFUSED = frozenset({401, 403, CloseCode.UNAUTHORIZED, CloseCode.REVOKED})


class NetmapError(ValueError):
    """A map, delta or stream message is malformed."""


NAT_MAPPINGS = ("EIM", "EDM", "none")  #: a peer's NAT mapping; "none": a public address, no NAT
NAT_PORTMAPS = ("upnp", "natpmp", "pcp")


@dataclass(frozen=True, slots=True)
class PeerNat:
    """A node's own netcheck facts, as its path report told the coordinator (issue 15: "why relayed?").

    Each field is None where the node does not know (yet). JSON: ``{"udp": bool, "mapping": "EIM" |
    "EDM" | "none", "portmap": "upnp" | "natpmp" | "pcp"}``, unknown fields left out (compact).
    """

    udp: bool | None = None  #: STUN over UDP answered (False: blocked)
    mapping: str | None = None  #: one of NAT_MAPPINGS
    portmap: str | None = None  #: one of NAT_PORTMAPS while a port map is active


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
    #: approved prefixes this node routes for others (subnet router; 0.0.0.0/0 and ::/0: exit node);
    #: JSON key ``r`` only when non-empty, so a map without routes keeps its bytes (issue 17)
    routes: tuple[str, ...] = ()
    #: the node's own netcheck facts (issue 15); JSON key ``f`` only when known, so a map without
    #: them keeps its bytes. Only peers the recipient may see are in its map, so only their facts.
    nat: PeerNat | None = None


@dataclass(frozen=True, slots=True)
class RelayRegion:
    """A relay (DERP-style) region and its STUN port."""

    id: int
    name: str
    url: str
    stun_port: int
    #: the region's IPv6 address when its URL names an IPv4 one (issue 15): STUN over IPv6 goes there, and
    #: an IPv6-only node reaches the relay at the URL with this host; JSON key ``ipv6`` only when set, so
    #: a region without one keeps its bytes
    ipv6: str = ""


@dataclass(frozen=True, slots=True)
class NetMap:
    """The full map for one node at `version`; peers sorted by node id, never containing self."""

    version: int
    self_node: Peer
    peers: tuple[Peer, ...]
    relays: tuple[RelayRegion, ...]
    policy: str  #: always "": maps no longer carry the policy text (least knowledge); kept for callers
    domain: str
    inbound: tuple[InboundRule, ...] = ALLOW_ALL  #: what this node lets in (meshd/firewall.py)
    #: the node's view token: nodes with one token see the same peers and rules, and a delta signed for
    #: the token (not per node) serves all of them (module docstring, "Shared deltas"); "" = none yet
    view: str = ""
    #: admin-defined DNS records (name, ip), sorted by name: `coordinator dns set` (issue 17); JSON key
    #: ``dns`` only when non-empty, so a map without records keeps its bytes
    dns_records: tuple[tuple[str, str], ...] = ()


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
    domain: str | None = None
    inbound: tuple[InboundRule, ...] | None = None
    view: str | None = None
    dns_records: tuple[tuple[str, str], ...] | None = None

    def is_empty(self) -> bool:
        return not (
            self.peers_added
            or self.peers_changed
            or self.peers_removed
            or self.endpoints_changed
            or self.self_node is not None
            or self.relays is not None
            or self.domain is not None
            or self.inbound is not None
            or self.dns_records is not None
            or self.view is not None
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
        domain=new.domain if new.domain != old.domain else None,
        inbound=new.inbound if new.inbound != old.inbound else None,
        dns_records=new.dns_records if new.dns_records != old.dns_records else None,
        view=new.view if new.view != old.view else None,
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
        policy=current.policy,
        domain=delta.domain if delta.domain is not None else current.domain,
        inbound=delta.inbound if delta.inbound is not None else current.inbound,
        dns_records=delta.dns_records if delta.dns_records is not None else current.dns_records,
        view=delta.view if delta.view is not None else current.view,
    )


# ---------------------------------------------------------------------------------------------- JSON codec


#: The map wire format (issue 16). Format 2 spells a peer record with one-letter keys and carries its
#: certificate as the signature and validity only (``c``, below); a stream or long poll asks for it with
#: ``?proto=2`` and the coordinator refuses any other (meshd older than format 2: "upgrade meshd").
MAP_FORMAT = 2
#: a server message at least this long goes as a binary frame holding its zlib-compressed text
#: (:func:`frame_server_message`): a full map is mostly JSON keys, addresses and base64 that deflate well
COMPRESS_AT = 4096


def peer_to_json(p: Peer) -> dict[str, Any]:
    """A peer record (format 2): ``i`` node id, ``n`` name, ``a`` addresses, ``w`` WireGuard key, ``k``
    node key, ``c`` certificate, ``e`` endpoints, ``h`` relay home, ``o`` online, ``t`` tags, ``r`` routes
    (the last five only when not empty/false), ``f`` the node's netcheck facts (issue 15, only when known).

    ``c`` is ``[serial, not_before, not_after, issuer, signature]`` when the certificate's payload is
    exactly what the record's own fields rebuild (meshd.proto.cert.assemble): the receiver reassembles
    the certificate from them and verifies it as before, so the signature covers the record's name,
    addresses, keys and tags. Any other certificate goes whole, as its string."""
    out: dict[str, Any] = {
        "i": p.node_id,
        "n": p.name,
        "a": list(p.ips),
        "w": p.wg_public_key,
        "k": p.node_public_key,
        "c": _cert_to_json(p),
    }
    if p.endpoints:
        out["e"] = list(p.endpoints)
    if p.relay_home is not None:
        out["h"] = p.relay_home
    if p.online:
        out["o"] = True
    if p.tags:
        out["t"] = list(p.tags)
    if p.routes:
        out["r"] = list(p.routes)
    if p.nat is not None:
        out["f"] = nat_to_json(p.nat)
    return out


def _rebuilt(p: Peer, serial: int, not_before: int, not_after: int, issuer: str) -> cert.CertPayload:
    return cert.CertPayload(
        version=cert.CERT_VERSION,
        serial=serial,
        name=p.name,
        node_id=p.node_id,
        ips=p.ips,
        wg_public_key=p.wg_public_key,
        node_public_key=p.node_public_key,
        tags=p.tags,
        not_before=not_before,
        not_after=not_after,
        issuer=issuer,
    )


def _cert_to_json(p: Peer) -> list[Any] | str:
    try:
        payload, _, signature = cert.decode(p.cert)
        rebuilt = _rebuilt(p, payload.serial, payload.not_before, payload.not_after, payload.issuer)
        if cert.assemble(rebuilt, signature) == p.cert:
            return [
                payload.serial,
                payload.not_before,
                payload.not_after,
                payload.issuer,
                b64encode(signature),
            ]
    except (cert.CertError, ValueError):  # not a certificate we can take apart: it goes whole
        pass
    return p.cert


def _cert_from_json(value: Any, p: Peer, where: str) -> str:
    if isinstance(value, str):
        return value
    if not (isinstance(value, list) and len(value) == 5):
        raise NetmapError(
            f"{where}: field c must be a certificate or [serial, not_before, not_after, issuer, sig]"
        )
    serial, not_before, not_after, issuer, sig = value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (serial, not_before, not_after)):
        raise NetmapError(f"{where}: certificate serial and validity must be integers")
    if not (isinstance(issuer, str) and len(issuer) == 16 and all(c in "0123456789abcdef" for c in issuer)):
        raise NetmapError(f"{where}: certificate issuer must be a 16-digit hex key id")
    try:
        signature = b64decode(sig, length=64, what="certificate signature")
        return cert.assemble(_rebuilt(p, serial, not_before, not_after, issuer), signature)
    except (ValueError, UnicodeEncodeError, RecursionError) as exc:  # lone surrogates in a name or tag
        raise NetmapError(f"{where}: {exc}") from None


def nat_to_json(n: PeerNat) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if n.udp is not None:
        out["udp"] = n.udp
    if n.mapping is not None:
        out["mapping"] = n.mapping
    if n.portmap is not None:
        out["portmap"] = n.portmap
    return out


def nat_from_json(raw: Any, where: str) -> PeerNat:
    """A peer's ``nat`` object: each known field one of its allowed values (others are ignored, so
    a later coordinator may add facts)."""
    o = _obj(raw, f"{where}.nat")
    udp, mapping, portmap = o.get("udp"), o.get("mapping"), o.get("portmap")
    if udp is not None and not isinstance(udp, bool):
        raise NetmapError(f"{where}.nat: udp must be a boolean")
    if mapping is not None and mapping not in NAT_MAPPINGS:
        raise NetmapError(f"{where}.nat: mapping must be one of {', '.join(NAT_MAPPINGS)}")
    if portmap is not None and portmap not in NAT_PORTMAPS:
        raise NetmapError(f"{where}.nat: portmap must be one of {', '.join(NAT_PORTMAPS)}")
    return PeerNat(udp, mapping, portmap)


def relay_to_json(r: RelayRegion) -> dict[str, Any]:
    return {
        "id": r.id,
        "name": r.name,
        "url": r.url,
        "stun_port": r.stun_port,
        **({"ipv6": r.ipv6} if r.ipv6 else {}),
    }


def map_to_json(m: NetMap) -> dict[str, Any]:
    return {
        "version": m.version,
        "self": peer_to_json(m.self_node),
        "peers": [peer_to_json(p) for p in m.peers],
        "relays": [relay_to_json(r) for r in m.relays],
        "domain": m.domain,
        "inbound": rules_to_json(m.inbound),
        **({"dns": records_to_json(m.dns_records)} if m.dns_records else {}),
        **({"view": m.view} if m.view else {}),
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
        out["endpoints_changed"] = [{"i": i, "e": list(e), "o": o} for i, e, o in d.endpoints_changed]
    if d.self_node is not None:
        out["self"] = peer_to_json(d.self_node)
    if d.relays is not None:
        out["relays"] = [relay_to_json(r) for r in d.relays]
    if d.domain is not None:
        out["domain"] = d.domain
    if d.inbound is not None:
        out["inbound"] = rules_to_json(d.inbound)
    if d.dns_records is not None:
        out["dns"] = records_to_json(d.dns_records)
    if d.view is not None:
        out["view"] = d.view
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
    relay = o.get("h")
    if relay is not None and (not isinstance(relay, int) or isinstance(relay, bool)):
        raise NetmapError(f"{where}: field h (relay home) must be int")
    online = o.get("o", False)
    if not isinstance(online, bool):
        raise NetmapError(f"{where}: field o (online) must be bool")
    peer = Peer(
        node_id=_get(o, "i", int, where),
        name=_get(o, "n", str, where),
        ips=_strs(o, "a", where),
        wg_public_key=_get(o, "w", str, where),
        node_public_key=_get(o, "k", str, where),
        cert="",
        endpoints=_map_candidates(_strs(o, "e", where)) if "e" in o else (),
        relay_home=relay,
        online=online,
        tags=_strs(o, "t", where) if "t" in o else (),
        routes=_routes(o, where),
        nat=nat_from_json(o["f"], where) if o.get("f") is not None else None,
    )
    if "c" not in o:
        raise NetmapError(f"{where}: missing field c")
    return replace(peer, cert=_cert_from_json(o["c"], peer, where))


MAX_ROUTES = 256  #: approved prefixes one peer may carry in a map


def _routes(o: dict[str, Any], where: str) -> tuple[str, ...]:
    """A peer's routed prefixes: canonical CIDRs (network address, no host bits), at most MAX_ROUTES."""
    if "r" not in o:
        return ()
    values = _strs(o, "r", where, MAX_ROUTES)
    for v in values:
        try:
            net = ipaddress.ip_network(v, strict=True)
        except ValueError:
            raise NetmapError(f"{where}: bad route {v[:64]!r}") from None
        if str(net) != v:
            raise NetmapError(f"{where}: route {v[:64]!r} is not canonical")
    return values


def relay_from_json(raw: Any) -> RelayRegion:
    from meshd.proto.relay import region_problem  # here: the relay codec is not needed for the rest

    o = _obj(raw, "relay")
    region = RelayRegion(
        id=_get(o, "id", int, "relay"),
        name=_get(o, "name", str, "relay"),
        url=_get(o, "url", str, "relay"),
        stun_port=_get(o, "stun_port", int, "relay"),
        ipv6=_relay_ipv6(o.get("ipv6", "")),
    )
    # a region meshd cannot use (``http://[`` raised ValueError deep in meshd and killed the stream task)
    if (problem := region_problem(region.id, region.name, region.url, region.stun_port)) is not None:
        raise NetmapError(f"relay {str(region.id)[:20]}: {problem}")
    return region


def _relay_ipv6(value: Any) -> str:
    """A relay region's ``ipv6``: "" or a unicast IPv6 address literal, normalised."""
    if value == "":
        return ""
    try:
        ip = ipaddress.IPv6Address(value) if isinstance(value, str) and len(value) <= 64 else None
    except ValueError:
        ip = None
    if ip is None or ip.scope_id is not None or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        raise NetmapError(f"relay: ipv6 {str(value)[:64]!r} is not a unicast IPv6 address")
    return str(ip)


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
        policy="",  # an older coordinator's policy text is not kept (least knowledge)
        domain=_get(o, "domain", str, "map"),
        inbound=ALLOW_ALL if inbound is None else inbound,
        dns_records=_records(o, "map") or (),
        view=_view(o.get("view", ""), "map"),
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
                _get(eo, "i", int, "delta.endpoints_changed"),
                _map_candidates(_strs(eo, "e", "delta.endpoints_changed")),
                _get(eo, "o", bool, "delta.endpoints_changed"),
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
        domain=_get(o, "domain", str, "delta", optional=True),
        inbound=_inbound(o, "delta"),
        dns_records=_records(o, "delta"),
        view=_view(o["view"], "delta") if "view" in o else None,
    )


def _view(value: Any, where: str) -> str:
    if value != "" and not (isinstance(value, str) and _is_token(value)):
        raise NetmapError(f"{where}: view must be a {VIEW_CHARS}-digit hex token")
    return str(value)


def _is_token(value: str) -> bool:
    return len(value) == VIEW_CHARS and all(c in "0123456789abcdef" for c in value)


MAX_DNS_RECORDS = 1024  #: admin-defined DNS records a map may carry


def records_to_json(records: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    return [{"name": name, "ip": ip} for name, ip in records]


def _records(o: dict[str, Any], where: str) -> tuple[tuple[str, str], ...] | None:
    """Admin DNS records (``dns``): names of DNS labels (a-z, 0-9, '-', dots, at most 200 characters),
    canonical IP addresses, at most MAX_DNS_RECORDS; None when absent."""
    if "dns" not in o:
        return None
    raw = _get(o, "dns", list, where)
    if len(raw) > MAX_DNS_RECORDS:
        raise NetmapError(f"{where}: more than {MAX_DNS_RECORDS} dns records")
    out = []
    for r in raw:
        ro = _obj(r, f"{where}.dns")
        name, ip = _get(ro, "name", str, f"{where}.dns"), _get(ro, "ip", str, f"{where}.dns")
        labels = name.split(".")
        if len(name) > 200 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise NetmapError(f"{where}: bad dns record name {name[:64]!r}")
        try:
            canonical = str(ipaddress.ip_address(ip))
        except ValueError:
            raise NetmapError(f"{where}: bad dns record address {ip[:64]!r}") from None
        if canonical != ip:
            raise NetmapError(f"{where}: dns record address {ip[:64]!r} is not canonical")
        out.append((name, ip))
    return tuple(out)


_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _node_id(p: Peer) -> int:
    return p.node_id


# ------------------------------------------------------------------------------------------ stream messages


@dataclass(frozen=True, slots=True)
class Signature:
    """How a map or delta message was signed (see the module docstring); ``digest`` is SHA-256 of the
    canonical body as received. Not part of a message's equality: two messages are equal by content."""

    key_id: str
    signature: bytes
    digest: bytes
    view: str | None = None  #: signed for this view token instead of the recipient's node id


@dataclass(frozen=True, slots=True)
class MapMessage:
    map: NetMap
    sig: Signature | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class DeltaMessage:
    delta: Delta
    sig: Signature | None = field(default=None, compare=False)


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


def signed_bytes(kind: str, node_id: int, digest: bytes) -> bytes:
    """What the coordinator signs for `kind` ("map" or "delta") sent to `node_id` (module docstring)."""
    return SIG_CONTEXT + f"{kind} {node_id}\n".encode("ascii") + digest


def body_digest(body: str | bytes) -> bytes:
    """SHA-256 of a canonical map/delta body (computed once per body, however many recipients)."""
    return hashlib.sha256(body.encode("utf-8") if isinstance(body, str) else body).digest()


def view_signed_bytes(view: str, digest: bytes) -> bytes:
    """What the coordinator signs for a delta shared by every node of view token `view`."""
    return SIG_CONTEXT + f"delta view:{view}\n".encode("ascii") + digest


def sign_body(kind: str, body: str, node_id: int, key: SigningKey, digest: bytes | None = None) -> str:
    """The signed message text for a canonical `body` (``canonical_json`` of a map/delta object)."""
    d = body_digest(body) if digest is None else digest
    return _signed_message(kind, body, key, signed_bytes(kind, node_id, d), "")


def sign_view_body(body: str, view: str, key: SigningKey, digest: bytes | None = None) -> str:
    """A delta message signed for every node of `view` (module docstring, "Shared deltas")."""
    d = body_digest(body) if digest is None else digest
    return _signed_message("delta", body, key, view_signed_bytes(view, d), f',"view":"{view}"')


def _signed_message(kind: str, body: str, key: SigningKey, signed: bytes, extra: str) -> str:
    sig = key.sign(signed).signature
    return (
        f'{{"type":"{kind}","{kind}":{body},"key":"{key_id(bytes(key.verify_key))}"{extra},'
        f'"sig":"{b64encode(sig)}"}}'
    )


def encode_signed(msg: MapMessage | DeltaMessage, node_id: int, key: SigningKey) -> str:
    """A map or delta message signed for `node_id` (what the coordinator sends)."""
    if isinstance(msg, MapMessage):
        return sign_body("map", canonical_json(map_to_json(msg.map)).decode("utf-8"), node_id, key)
    return sign_body("delta", canonical_json(delta_to_json(msg.delta)).decode("utf-8"), node_id, key)


def signer(msg: MapMessage | DeltaMessage) -> str | None:
    """The key id a map or delta message claims to be signed by (None: unsigned)."""
    return msg.sig.key_id if msg.sig is not None else None


def verify(
    msg: MapMessage | DeltaMessage,
    node_id: int,
    trusted_keys: Iterable[bytes],
    current: NetMap | None = None,
) -> None:
    """Raise NetmapError unless `msg` is signed for `node_id` by one of `trusted_keys`. A delta signed
    for a view token (shared) passes only for a node holding `current` in that view and not named by it."""
    kind = "map" if isinstance(msg, MapMessage) else "delta"
    if msg.sig is None:
        raise NetmapError(f"{kind}: not signed")
    public = {key_id(k): k for k in trusted_keys}.get(msg.sig.key_id)
    if public is None:
        raise NetmapError(f"{kind}: signed by unknown key {msg.sig.key_id}")
    if msg.sig.view is None:
        signed = signed_bytes(kind, node_id, msg.sig.digest)
    else:
        _check_shared(msg, node_id, current, msg.sig.view)
        signed = view_signed_bytes(msg.sig.view, msg.sig.digest)
    try:
        VerifyKey(public).verify(signed, msg.sig.signature)
    except (BadSignatureError, CryptoError, ValueError, TypeError):
        raise NetmapError(
            f"{kind} {_versions(msg)}: signature by key {msg.sig.key_id} does not verify for node {node_id}"
        ) from None


def _check_shared(msg: MapMessage | DeltaMessage, node_id: int, current: NetMap | None, view: str) -> None:
    """A view-signed message is for `node_id` only if it is a delta for the view `current` holds that
    leaves the node itself alone (a change to the node always comes signed for the node)."""
    if not isinstance(msg, DeltaMessage):
        raise NetmapError("map: a full map is signed for its node, never for a view")
    d = msg.delta
    if current is None or current.view != view:
        raise NetmapError(f"delta {_versions(msg)}: signed for view {view}, not this node's view")
    named = {*d.peers_removed, *(i for i, _, _ in d.endpoints_changed)}
    named.update(p.node_id for p in (*d.peers_added, *d.peers_changed))
    if node_id in named or d.self_node is not None or d.view is not None:
        raise NetmapError(f"delta {_versions(msg)}: a delta signed for a view changes node {node_id}")


def check_order(current: NetMap | None, msg: MapMessage | DeltaMessage) -> None:
    """Raise NetmapError when `msg` cannot follow `current`: a full map older than what we hold, or a
    delta that does not start at exactly our version (a replayed, reordered or skipped delta)."""
    if isinstance(msg, MapMessage):
        if current is not None and msg.map.version < current.version:
            raise NetmapError(f"map version {msg.map.version} is older than ours ({current.version})")
        return
    d = msg.delta
    if current is None:
        raise NetmapError(f"delta {d.from_version}->{d.version} without a map to apply it to")
    if d.from_version != current.version or d.version < d.from_version:
        raise NetmapError(
            f"delta {d.from_version}->{d.version} does not follow our version {current.version}"
        )


def _versions(msg: MapMessage | DeltaMessage) -> str:
    if isinstance(msg, MapMessage):
        return f"version {msg.map.version}"
    return f"{msg.delta.from_version}->{msg.delta.version}"


def _signature(o: dict[str, Any], body: Any) -> Signature | None:
    if "sig" not in o and "key" not in o:
        return None
    key = _get(o, "key", str, "message")
    if len(key) != 16 or any(c not in "0123456789abcdef" for c in key):
        raise NetmapError("message: key must be a 16-digit hex key id")
    view = o.get("view")
    if view is not None and not (isinstance(view, str) and _is_token(view)):
        raise NetmapError(f"message: view must be a {VIEW_CHARS}-digit hex token")
    try:
        signature = b64decode(_get(o, "sig", str, "message"), length=64, what="sig")
        digest = body_digest(canonical_json(body))
    except (ValueError, UnicodeEncodeError, RecursionError) as exc:  # lone surrogates, bad base64
        raise NetmapError(f"message: {exc}") from None
    return Signature(key, signature, digest, view)


def encode_server_message(msg: ServerMessage) -> str:
    """Unsigned encoding (tests, tools); the coordinator sends maps and deltas with :func:`encode_signed`."""
    if isinstance(msg, MapMessage):
        return json.dumps({"type": "map", "map": map_to_json(msg.map)}, separators=(",", ":"))
    if isinstance(msg, DeltaMessage):
        return json.dumps({"type": "delta", "delta": delta_to_json(msg.delta)}, separators=(",", ":"))
    if isinstance(msg, SignalMessage):
        return json.dumps({"type": "signal", "from": msg.peer, "payload": msg.payload}, separators=(",", ":"))
    return json.dumps({"type": "error", "message": msg.message})


def frame_server_message(text: str) -> str | bytes:
    """What the stream sends for a server message: the text itself, or for a long one (a full map, a
    delta after a policy change) a binary frame of its zlib-compressed UTF-8 (:func:`inflate_frame`).
    Compression is per message, so the same bytes may go to any stream; nothing is negotiated per
    connection (no permessage-deflate state per stream)."""
    if len(text) < COMPRESS_AT:
        return text
    return zlib.compress(text.encode("utf-8"), 6)


def inflate_frame(data: bytes, max_bytes: int = 256 * 1024 * 1024) -> str:
    """The message text of a binary stream frame (:func:`frame_server_message`): NetmapError when it is
    not one complete zlib stream of UTF-8 text of at most `max_bytes` (a bomb stops at the bound)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error:
        raise NetmapError("binary frame is not zlib data") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise NetmapError("message too large")
    if not inflater.eof or inflater.unused_data:
        raise NetmapError("binary frame is not one complete zlib stream")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise NetmapError("message is not UTF-8") from None


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


def canonical_candidate(text: str) -> str:
    """``"ip:port"`` / ``"[ipv6]:port"`` re-spelt canonically; NetmapError for anything else.

    Candidates end up in WireGuard's UAPI text, status output and logs, so only the canonical spelling
    of an address literal passes: no IPv6 zone id (``%eth0``: a zone id may hold any character, a
    newline included, and is meaningless to another host), no control character, no names.
    """
    if len(text) > 64 or not text.isascii() or not text.isprintable() or "%" in text:
        raise NetmapError(f"endpoints: candidate {text!r} is not an address literal with a port")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        raise NetmapError(f"endpoints: candidate {text!r} has no port in 1..65535")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise NetmapError(f"endpoints: candidate {text!r} is not an IP address") from None
    if (ip.version == 6) != bracketed:
        raise NetmapError(f"endpoints: candidate {text!r}: IPv6 goes in brackets, IPv4 not")
    return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"


def _map_candidates(candidates: tuple[str, ...]) -> tuple[str, ...]:
    """A peer's candidates from a map, canonical ones only: a value stored by an older coordinator (a
    zone id holding a newline) is dropped here, so that it costs this peer one path, not the whole map."""
    out = []
    for c in candidates:
        try:
            out.append(canonical_candidate(c))
        except NetmapError:
            continue
    return tuple(out)


def decode_client_message(text: str | bytes) -> ClientMessage:
    """Parse a node->server message (bounded size, strict types)."""
    o = _load(text)
    kind = o.get("type")
    if kind == "endpoints":
        candidates = _strs(o, "candidates", "endpoints", limit=MAX_CANDIDATES)
        if any(len(c) > 64 for c in candidates):
            raise NetmapError("endpoints: candidate longer than 64 characters")
        return EndpointsMessage(tuple(canonical_candidate(c) for c in candidates))
    if kind == "signal":
        return SignalMessage(_get(o, "to", int, "signal"), _get(o, "payload", dict, "signal"))
    raise NetmapError(f"unknown message type {kind!r}")


def decode_server_message(text: str | bytes, max_bytes: int = 256 * 1024 * 1024) -> ServerMessage:
    """Parse a server->node message. A map or delta carries its :class:`Signature` if it has one; it is
    checked by :func:`verify` (the caller knows its node id and trusted keys), not here."""
    if len(text) > max_bytes:
        raise NetmapError("message too large")
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise NetmapError("message is not JSON") from None
    o = _obj(raw, "message")
    kind = o.get("type")
    if kind == "map":
        return MapMessage(map_from_json(o.get("map")), _signature(o, o.get("map")))
    if kind == "delta":
        return DeltaMessage(delta_from_json(o.get("delta")), _signature(o, o.get("delta")))
    if kind == "signal":
        return SignalMessage(_get(o, "from", int, "signal"), _get(o, "payload", dict, "signal"))
    if kind == "error":
        return ErrorMessage(_get(o, "message", str, "error"))
    raise NetmapError(f"unknown message type {kind!r}")

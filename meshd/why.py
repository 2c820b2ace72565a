"""Why is this peer relayed? One sentence a person can act on, from both sides' netcheck facts (pure).

The verdict combines what each side knows about its own network (:class:`NetFacts`: UDP reachability,
NAT mapping behaviour, port-map support, a public address) into the first reason, in this order, that
explains the relay:

1. UDP blocked on one or both networks: only the TCP relay carries packets;
2. both mappings endpoint-dependent (EDM) and neither side port-mapped: no passable port pair;
3. one EDM side without a port map against an EIM side behind a NAT that filters by address and port
   (every Linux/home router): the EDM side's port for us is unknowable, the EIM side's router drops it;
4. a fact is missing (the peer has not reported, netcheck not run): say which;
5. otherwise a direct path should exist: the probes are not answered (a firewall between them, or the
   attempt is still running).

``verdict`` returns None on a direct path: nothing to explain.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mapping(enum.StrEnum):
    """How a NAT maps one inside port (RFC 4787 §4.1)."""

    NONE = "none"  #: a public address: no NAT
    EIM = "EIM"  #: endpoint-independent: one public port for every destination
    EDM = "EDM"  #: address- or port-dependent: a new public port per destination


@dataclass(frozen=True, slots=True)
class NetFacts:
    """What one side's netcheck found; None where it does not know."""

    name: str
    udp: bool | None  #: STUN over UDP answered
    mapping: Mapping | None
    portmap: str | None = None  #: "upnp", "natpmp", "pcp" or None (no port mapping)


def _has_map(f: NetFacts) -> bool:
    return f.portmap is not None


def _describe(f: NetFacts) -> str:
    if f.mapping is Mapping.NONE:
        return f"{f.name}: public address"
    mapping = f.mapping.value if f.mapping is not None else "NAT type unknown"
    return f"{f.name}: {mapping}" + (f" with {f.portmap} port mapping" if _has_map(f) else "")


def verdict(a: NetFacts, b: NetFacts, *, direct: bool) -> str | None:
    """The reason ``a``'s packets to ``b`` are relayed, or None when the path is direct."""
    if direct:
        return None
    blocked = [f.name for f in (a, b) if f.udp is False]
    if len(blocked) == 2:
        return f"UDP blocked on {a.name}'s and {b.name}'s networks: TCP relay; allow outbound UDP on either"
    if blocked:
        return f"UDP blocked on {blocked[0]}'s network: TCP relay; allow outbound UDP there for a direct path"
    if a.mapping is Mapping.EDM and b.mapping is Mapping.EDM and not (_has_map(a) or _has_map(b)):
        return (
            f"{a.name}: EDM, {b.name}: EDM, neither with port mapping: no passable port pair; "
            f"enable UPnP or NAT-PMP on {a.name}'s or {b.name}'s router"
        )
    for edm, other in ((a, b), (b, a)):
        if (
            edm.mapping is Mapping.EDM
            and not _has_map(edm)
            and other.mapping is Mapping.EIM
            and not _has_map(other)
        ):
            sides = [_describe(f) + (" without port mapping" if f is edm else "") for f in (a, b)]
            return f"{', '.join(sides)}: no passable port pair; enable UPnP or NAT-PMP on {edm.name}'s router"
    unknown = [f.name for f in (a, b) if f.udp is None or f.mapping is None]
    if unknown:
        who = " and ".join(unknown)
        return f"no netcheck facts from {who} yet: cannot tell; relayed until probes are answered"
    return (
        f"{_describe(a)}, {_describe(b)}: a direct path should exist but probes are not answered; "
        "a firewall between them may drop UDP (or the attempt is still running)"
    )


def side(name: str, udp: bool | None, mapping: str | None, portmap: str | None) -> NetFacts:
    """One side's facts from their wire form (a path report, the map's ``nat``); an unknown mapping
    spelling counts as not known."""
    known = mapping in {m.value for m in Mapping}
    return NetFacts(name, udp, Mapping(mapping) if known and mapping is not None else None, portmap)


def for_path(path: str, a: NetFacts, b: NetFacts) -> str | None:
    """``meshd status``'s ``why`` of ``a``'s path to ``b``: a sentence while relayed, else None (a direct
    path needs no explanation, and "none" is no path at all: the peer is away, not relayed)."""
    return verdict(a, b, direct=False) if path == "relay" else None


def summary(f: NetFacts) -> str:
    """One side's facts for a person: ``UDP yes, NAT EDM, port mapping none``."""
    udp = {True: "yes", False: "blocked", None: "unknown"}[f.udp]
    if f.mapping is Mapping.NONE:
        return f"UDP {udp}, public address (no NAT)"
    nat = f.mapping.value if f.mapping is not None else "unknown"
    return f"UDP {udp}, NAT {nat}, port mapping {f.portmap or 'none'}"
